"""`POST /acedata/{service}/tasks`: AceData's own task protocol, answered by the tracker.

An application that polls AceData changes its base URL to `{tracker}/acedata` and its
token to a tracker API key, and nothing else: `retrieve` answers one task record,
`retrieve_batch` `{"items": [...], "count": N}`, errors come in the vendor's body
`{"success": false, "error": {"code", "message"}, "trace_id"}` (400 `bad_request`,
401 `invalid_token`, 429 `too_many_requests`, 500 `api_error`), and an id it cannot
answer for is answered as the vendor answers an unknown id (`{}`, or left out of a
batch).

Records come from what the tracker has observed. The client's own registrations are
answered from their stored record, and asking about one keeps its polls at the poll
interval (however old the task), so the answer stays fresh within a poll interval
while someone asks. An id nobody tracks is fetched once from the upstream with the
client's token (within its request budget) and registered for the client, so the
tracker polls it from then on. An id only other clients track is, for this client,
unknown: no client learns of another's tasks.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from tracker.api.deps import bearer_scheme, current_client
from tracker.api.errors import ApiError
from tracker.api.resources import AceDataError
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.engine import transaction
from tracker.db.models import Client, task_schedule_table, tasks_table
from tracker.errors import (
    BudgetUnavailable,
    TokenUnavailable,
    UpstreamError,
    UpstreamRateLimited,
)
from tracker.polling import PollBatch, apply_batch_answer
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import SERVICE_PATTERN, TASK_ID_PATTERN, TaskRegistration
from tracker.upstream.credentials import client_credential
from tracker.worker.pollers import Poller, make_poller

log = logging.getLogger("tracker.api")

router = APIRouter(tags=["acedata"])

MAX_BATCH_IDS = 500
# A facade request waits this long at most for the token's next upstream request slot.
FETCH_MAX_WAIT = 2.0
USAGE = 'Use {"id": ID, "action": "retrieve"} or {"ids": [ID, ...], "action": "retrieve_batch"}.'


class VendorError(Exception):
    """An answer in the vendor's error body."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    def response(self) -> JSONResponse:
        body = {
            "success": False,
            "error": {"code": self.code, "message": self.message},
            "trace_id": str(uuid.uuid4()),
        }
        headers = {"retry-after": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# The body as AceData documents it, stated for the OpenAPI document: the route reads it
# itself, so that malformed input answers in the vendor's shape (400 `bad_request`).
_TASK_ID_SCHEMA = {"type": "string", "pattern": TASK_ID_PATTERN}
_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {"id": _TASK_ID_SCHEMA, "action": {"const": "retrieve"}},
                        "required": ["id", "action"],
                    },
                    {
                        "type": "object",
                        "properties": {
                            "ids": {
                                "type": "array",
                                "items": _TASK_ID_SCHEMA,
                                "minItems": 1,
                                "maxItems": MAX_BATCH_IDS,
                            },
                            "action": {"const": "retrieve_batch"},
                        },
                        "required": ["ids", "action"],
                    },
                ]
            }
        }
    },
}
_SERVICE_PARAMETER = {
    "name": "service",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": SERVICE_PATTERN},
}


@router.post(
    "/acedata/{service}/tasks",
    summary="AceData's task API (retrieve, retrieve_batch), answered by the tracker",
    openapi_extra={"requestBody": _REQUEST_BODY, "parameters": [_SERVICE_PARAMETER]},
    responses={
        200: {"description": "A task record, `{}` for an unknown id, or `{items, count}`."},
        400: {"model": AceDataError, "description": "Not a retrieve body (`bad_request`)."},
        401: {"model": AceDataError, "description": "No or an unknown tracker API key."},
        404: {"model": AceDataError, "description": "Not a service name (`not_found`)."},
        # Never sent: malformed input answers 400 in the vendor's shape.
        422: {"model": AceDataError, "description": "Not used (malformed input answers 400)."},
        429: {"model": AceDataError, "description": "No upstream slot for a fetch now."},
        500: {"model": AceDataError, "description": "AceData could not be asked (`api_error`)."},
    },
)
async def acedata_tasks(request: Request) -> JSONResponse:
    """`{"id", "action": "retrieve"}` or `{"ids", "action": "retrieve_batch"}`, with
    `Authorization: Bearer <tracker API key>`; answers in AceData's shapes."""
    # Read here, not declared: a bad name answers the vendor's 404, not a 422.
    service: str = request.path_params["service"]
    try:
        if re.fullmatch(SERVICE_PATTERN, service) is None:
            raise VendorError(404, "not_found", f"No service {service[:40]!r}.")
        try:
            client = await current_client(request, await bearer_scheme(request))
        except ApiError:
            raise VendorError(
                401, "invalid_token", "The token is missing or invalid: send a tracker API key."
            ) from None
        action, ids = _parse(await request.body())
        records = await run_in_threadpool(_records, request, client, service, ids)
    except VendorError as exc:
        return exc.response()
    if action == "retrieve":
        return JSONResponse(records.get(ids[0]) or {})
    items = [records[task_id] for task_id in dict.fromkeys(ids) if records.get(task_id)]
    return JSONResponse({"items": items, "count": len(items)})


def _parse(raw: bytes) -> tuple[str, list[str]]:
    """(action, ids) of a request body; VendorError 400 otherwise."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise VendorError(400, "bad_request", "The body must be a JSON object. " + USAGE) from None
    if not isinstance(body, dict):
        raise VendorError(400, "bad_request", "The body must be a JSON object. " + USAGE)
    action = body.get("action")
    ids: Any
    if action == "retrieve":
        ids = [body.get("id")]
    elif action == "retrieve_batch":
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_BATCH_IDS:
            raise VendorError(
                400, "bad_request", f"`ids` must be a list of 1 to {MAX_BATCH_IDS} task ids."
            )
    else:
        raise VendorError(400, "bad_request", f"Unknown action {str(action)[:40]!r}. " + USAGE)
    for task_id in ids:
        if not isinstance(task_id, str) or re.fullmatch(TASK_ID_PATTERN, task_id) is None:
            raise VendorError(
                400,
                "bad_request",
                f"Not a task id: {str(task_id)[:80]!r} (1-128 of A-Za-z0-9._:-).",
            )
    return str(action), [str(task_id) for task_id in ids]


def _records(
    request: Request, client: Client, service: str, ids: Sequence[str]
) -> dict[str, dict[str, Any] | None]:
    """The record of each id this client may see: stored, or fetched once and registered."""
    settings: Settings = request.app.state.settings
    sessions: sessionmaker[Session] = request.app.state.sessions
    now = utcnow()
    with transaction(sessions) as session:
        rows = session.execute(
            select(
                tasks_table.c.id,
                tasks_table.c.task_id,
                tasks_table.c.client_id,
                tasks_table.c.record,
            ).where(tasks_table.c.service == service, tasks_table.c.task_id.in_(set(ids)))
        ).all()
        mine = {row.task_id: row for row in rows if row.client_id == client.id}
        tracked = {row.task_id for row in rows}
        # Someone is asking: poll these at the fresh-task interval, however old they are.
        soon = now + timedelta(seconds=settings.poll_interval)
        session.execute(
            update(task_schedule_table)
            .where(
                task_schedule_table.c.task_row_id.in_([row.id for row in mine.values()]),
                task_schedule_table.c.next_poll_at > soon,
            )
            .values(next_poll_at=soon)
        )
        fresh_client = session.get(Client, client.id)
    records: dict[str, dict[str, Any] | None] = {
        task_id: row.record for task_id, row in mine.items()
    }
    unknown = [task_id for task_id in dict.fromkeys(ids) if task_id not in tracked]
    unseen = [task_id for task_id, row in mine.items() if row.record is None]
    if (unknown or unseen) and fresh_client is not None:
        fetched = _fetch(request, fresh_client, service, [*unknown, *unseen])
        records.update({task_id: fetched[task_id] for task_id in unseen if task_id in fetched})
        found = [task_id for task_id in unknown if task_id in fetched]
        if found:
            _register(sessions, fresh_client, service, found, fetched, settings)
            records.update({task_id: fetched[task_id] for task_id in found})
    return records


def _fetch(
    request: Request, client: Client, service: str, ids: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Ask the upstream once, with the client's token, within its budget."""
    try:
        poller = _pollers(request).for_client(
            client, request.app.state.settings, request.app.state.sessions
        )
        return poller.upstream.retrieve_batch(service, ids)
    except BudgetUnavailable as exc:
        wait = max(1, int((exc.retry_at - utcnow()).total_seconds() + 1))
        raise VendorError(
            429, "too_many_requests", "Too many requests; retry later.", retry_after=wait
        ) from None
    except UpstreamRateLimited as exc:
        wait = max(1, int(exc.retry_after or 1))
        raise VendorError(
            429, "too_many_requests", "Too many requests; retry later.", retry_after=wait
        ) from None
    except (UpstreamError, TokenUnavailable) as exc:
        log.warning("the AceData facade could not fetch %d %s ids: %s", len(ids), service, exc)
        raise VendorError(
            500, "api_error", "The tracker could not ask AceData for these tasks; retry later."
        ) from None


def _register(
    sessions: sessionmaker[Session],
    client: Client,
    service: str,
    task_ids: Sequence[str],
    records: dict[str, dict[str, Any]],
    settings: Settings,
) -> None:
    """Track ids first seen through the facade for `client`, with the record just fetched."""
    now = utcnow()
    with transaction(sessions) as session:
        for task_id in task_ids:
            registration = TaskRegistration(task_id=task_id, service=service)
            register_task(session, client, registration, now=now, settings=settings)
        apply_batch_answer(
            session, PollBatch(service, tuple(task_ids)), records, now=now, settings=settings
        )


class FacadePollers:
    """One upstream client and budget per token, for this API process's facade fetches."""

    def __init__(self) -> None:
        self._by_key: dict[str, Poller] = {}
        self._lock = threading.Lock()

    def for_client(
        self, client: Client, settings: Settings, sessions: sessionmaker[Session]
    ) -> Poller:
        credential = client_credential(client, settings=settings)
        with self._lock:
            poller = self._by_key.get(credential.key)
            if poller is None:
                poller = self._by_key[credential.key] = make_poller(
                    settings, sessions, credential, max_wait=FETCH_MAX_WAIT
                )
            return poller


def _pollers(request: Request) -> FacadePollers:
    pollers: FacadePollers = request.app.state.facade_pollers
    return pollers
