"""`POST /v1/{service}/submit`: start a generation through the tracker and track it at once.

The body is validated before anything is sent. The vendor request goes to
`{TRACKER_UPSTREAM_URL}/{service}/{endpoint}` unchanged, except `callback_url`,
which becomes the task's doorbell when TRACKER_PUBLIC_URL is set; it is sent with
the client's own upstream token, or the tracker's. The task id the vendor answers
is registered, with the doorbell's hash, in the same way as `POST /v1/tasks`.

A submission spends credits, so it is sent once and never retried. A vendor error
is relayed with the vendor's status and body, and nothing is registered. With an
`Idempotency-Key` header, the first answer is kept and a retry with the same key is
answered it again, without a second submission.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from tracker.api.deps import CurrentClient, SettingsDep, request_transaction
from tracker.api.errors import ApiError, error_responses, trace_id_of
from tracker.api.resources import SubmitResult, UpstreamErrorBody
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.models import Client, IdempotencyKey
from tracker.db.queries import task_resource
from tracker.errors import RegistrationConflict, TokenUnavailable, UpstreamServerError
from tracker.polling.doorbell import doorbell_hash, doorbell_url, new_doorbell_token
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import SERVICE_PATTERN, TASK_ID_PATTERN, TaskRegistration
from tracker.tracking.submissions import (
    IDEMPOTENCY_KEY_PATTERN,
    SubmitRequest,
    claim_idempotency_key,
    complete_idempotency_key,
    submission_hash,
)
from tracker.upstream.client import SubmitAnswer, UpstreamClient
from tracker.upstream.credentials import Credential, client_credential

log = logging.getLogger("tracker.api")

router = APIRouter(tags=["submit"], responses=error_responses(401, 500))

ServicePath = Annotated[
    str, Path(pattern=SERVICE_PATTERN, max_length=32, description="The upstream service.")
]
IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description=(
            "Any unique string (<= 255 printable characters) naming this submission: a retry "
            "with the same key and body is answered the first answer, and sends nothing."
        ),
    ),
]
REPLAYED_HEADER = "Idempotent-Replayed"


@router.post(
    "/v1/{service}/submit",
    status_code=201,
    response_model=SubmitResult,
    summary="Submit a generation and track its task",
    responses={
        201: {"description": "Submitted and registered; `upstream` is the vendor's answer."},
        400: error_responses(400)[400],
        409: {
            "model": UpstreamErrorBody,
            "description": "A submission with this Idempotency-Key is still in flight.",
        },
        413: error_responses(413)[413],
        422: error_responses(422)[422],
        502: {
            "model": UpstreamErrorBody,
            "description": "The upstream could not be reached, or answered no task id.",
        },
        503: {
            "model": UpstreamErrorBody,
            "description": "The client's upstream token cannot be used, or the database is down.",
        },
        "4XX": {
            "model": UpstreamErrorBody,
            "description": "The vendor refused the request (`upstream_rejected`), with its status.",
        },
    },
)
def submit(
    service: ServicePath,
    submission: SubmitRequest,
    request: Request,
    client: CurrentClient,
    settings: SettingsDep,
    idempotency_key: IdempotencyHeader = None,
) -> JSONResponse:
    """Forward `request` to the vendor's `{service}/{endpoint}` and register the task it
    starts; the vendor's error, if any, with its status, registering nothing."""
    key_id: int | None = None
    if idempotency_key is not None:
        earlier, key_id = _claim_key(request, client, idempotency_key, service, submission)
        if earlier is not None:
            return earlier
    try:
        status, body = _submit(request, client, settings, service, submission)
    except BaseException:
        # Only what fails before the vendor answers escapes `_submit`: nothing was sent,
        # so the key is free again.
        if key_id is not None:
            _release_key(request, key_id)
        raise
    if key_id is not None:
        with request_transaction(request) as session:
            complete_idempotency_key(session, key_id, status, body, now=utcnow())
    return JSONResponse(body, status_code=status)


def _claim_key(
    request: Request, client: Client, key: str, service: str, submission: SubmitRequest
) -> tuple[JSONResponse | None, int | None]:
    """(the earlier answer to give again, None) or (None, the key's row to complete)."""
    fingerprint = submission_hash(service, submission)
    with request_transaction(request) as session:
        claim = claim_idempotency_key(session, client, key, fingerprint, now=utcnow())
        if claim.row is not None:
            return None, claim.row.id
        earlier = claim.earlier
        assert earlier is not None
        seen = (earlier.request_hash, earlier.status_code, earlier.answer)
    request_hash, status, answer = seen
    if request_hash != fingerprint:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"Idempotency-Key: was used for another submission (got {key!r}); a key names "
            "one submission: send a new key for a new one",
        )
    if status is None or answer is None:
        raise ApiError(
            409,
            "submission_in_progress",
            f"Idempotency-Key: a submission with this key is still in flight (got {key!r}); "
            "send it again in a few seconds to get its answer",
            headers={"Retry-After": "2"},
        )
    return JSONResponse(answer, status_code=status, headers={REPLAYED_HEADER: "true"}), None


def _release_key(request: Request, key_id: int) -> None:
    with request_transaction(request) as session:
        row = session.get(IdempotencyKey, key_id)
        if row is not None and row.status_code is None:
            session.delete(row)


def _submit(
    request: Request,
    client: Client,
    settings: Settings,
    service: str,
    submission: SubmitRequest,
) -> tuple[int, dict[str, Any]]:
    """Send the submission once and register its task: (status, body) of the answer."""
    trace_id = trace_id_of(request)
    credential = _credential(request, client, settings)
    body = dict(submission.request)
    token = None
    if settings.public_url:
        token = new_doorbell_token()
        body["callback_url"] = doorbell_url(settings.public_url, token)
    upstream = _submitters(request).client_for(credential, settings)
    try:
        answer = upstream.submit(service, submission.endpoint, body)
    except UpstreamServerError as exc:
        status = 504 if exc.code == "timeout" else 502
        message = (
            f"the upstream did not answer the submission ({exc.message}); it may or may not "
            "have started the task, and nothing was registered: check with the vendor before "
            "submitting again"
        )
        return status, _error("upstream_unavailable", message, None, trace_id)
    if not answer.accepted:
        return _relay_rejection(answer, service, submission.endpoint, trace_id)
    task_id = answer.body.get("task_id") if isinstance(answer.body, dict) else None
    if not isinstance(task_id, str) or not _valid_task_id(task_id):
        message = (
            f"the upstream accepted the submission but answered no task id the tracker can "
            f"track (got {task_id!r}); nothing was registered, and the vendor may have "
            "started a task: see `upstream`"
        )
        return 502, _error("upstream_bad_answer", message, answer.body, trace_id)
    registration = TaskRegistration(
        task_id=task_id,
        service=service,
        callback_url=submission.callback_url,
        metadata=submission.metadata,
        events=submission.events,
        timeout_seconds=submission.timeout_seconds,
    )
    try:
        with request_transaction(request) as session:
            registered = register_task(
                session,
                client,
                registration,
                settings=settings,
                doorbell_hash=doorbell_hash(token) if token else None,
            )
            task = task_resource(registered.task)
    except RegistrationConflict as exc:
        return 409, _error(exc.code, exc.message, answer.body, trace_id)
    except OperationalError:
        message = (
            f"the upstream started task {task_id!r}, but the tracker's database cannot be "
            "reached to register it: register it with POST /v1/tasks once /readyz is ready"
        )
        return 503, _error("database_unavailable", message, answer.body, trace_id)
    except Exception:  # the vendor has started the task: say which, never lose the answer
        log.exception("registering submitted task %r failed (trace_id=%s)", task_id, trace_id)
        message = (
            f"the upstream started task {task_id!r}, but the tracker failed to register it "
            f"(logged under trace id {trace_id}): register it with POST /v1/tasks"
        )
        return 500, _error("internal_error", message, answer.body, trace_id)
    return 201, {"upstream": answer.body, "task": task}


def _credential(request: Request, client: Client, settings: Settings) -> Credential:
    """The client's token as it is now (the API key cache may hold an older client row)."""
    with request_transaction(request) as session:
        fresh = session.get(Client, client.id)
        if fresh is None:
            raise ApiError(401, "invalid_api_key", "Authorization: the client no longer exists")
        try:
            return client_credential(fresh, settings=settings)
        except TokenUnavailable as exc:
            raise ApiError(
                503,
                exc.code,
                "this client's own upstream token cannot be used on this tracker; nothing "
                "was sent. The operator must fix TRACKER_SECRET_KEY (the server's log says "
                "why)",
            ) from None


def _relay_rejection(
    answer: SubmitAnswer, service: str, endpoint: str, trace_id: str
) -> tuple[int, dict[str, Any]]:
    status = answer.status if answer.status >= 400 else 502
    vendor = answer.body.get("error") if isinstance(answer.body, dict) else None
    said = ""
    if isinstance(vendor, dict):
        said = f" {vendor.get('code')}: {vendor.get('message')}"
    message = (
        f"the upstream refused the submission to /{service}/{endpoint} with "
        f"{answer.status}{said}; nothing was registered. Fix the request as the vendor's "
        "answer (`upstream`) says"
    )
    return status, _error("upstream_rejected", message, answer.body, trace_id)


def _error(code: str, message: str, upstream: Any, trace_id: str) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if upstream is not None:
        error["upstream"] = upstream
    return {"error": error, "trace_id": trace_id}


def _valid_task_id(task_id: str) -> bool:
    return re.fullmatch(TASK_ID_PATTERN, task_id) is not None


class Submitters:
    """One pooled upstream client per token, for submissions from this API process."""

    def __init__(self) -> None:
        self._clients: dict[str, UpstreamClient] = {}
        self._lock = threading.Lock()

    def client_for(self, credential: Credential, settings: Settings) -> UpstreamClient:
        with self._lock:
            client = self._clients.get(credential.key)
            if client is None:
                client = self._clients[credential.key] = UpstreamClient(
                    settings.upstream_url,
                    credential.token,
                    read_timeout=settings.upstream_timeout,
                    max_retries=0,
                )
            return client


def _submitters(request: Request) -> Submitters:
    submitters: Submitters = request.app.state.submitters
    return submitters
