"""Every error answer in one shape (docs/api.md):

    {"error": {"code": "<snake_case>", "message": "<what and how to fix>"}, "trace_id": "<id>"}

Tracker errors map to their status by class (NotFound 404, Conflict 409,
InvalidQuery 422); FastAPI's validation errors become one message naming each
bad field (`tasks[3].callback_url: ...`), or 400 `invalid_json` when the body
is not JSON at all; Starlette's own errors (unknown route, wrong method) keep
their status; a database that cannot be reached (restarting, down, locked)
answers 503 `database_unavailable`, to be retried. The last-resort 500 lives in
the middleware, which sees every exception no handler took.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import ErrorDetails
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Route

from tracker.api.resources import ErrorBody
from tracker.errors import Conflict, InvalidQuery, NotFound, TrackerError

VALIDATION_ERROR = "validation_error"
INVALID_CURSOR = "invalid_cursor"
_MAX_PROBLEMS = 10
_MAX_SHOWN_INPUT = 80

_CODE_FOR_STATUS = {
    400: "bad_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: VALIDATION_ERROR,
    429: "too_many_requests",
}


class ApiError(HTTPException):
    """An error answer raised from anywhere in a request, with its snake_case code."""

    def __init__(
        self, status_code: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status_code, detail=message, headers=dict(headers or {}) or None)
        self.code = code
        self.message = message


def trace_id_of(request: Request) -> str:
    """The request's trace id, set by the middleware (a fresh one if it somehow is not)."""
    trace_id = getattr(request.state, "trace_id", None)
    return trace_id if isinstance(trace_id, str) else uuid.uuid4().hex


def error_body(code: str, message: str, trace_id: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}, "trace_id": trace_id}


def error_response(
    status_code: int,
    code: str,
    message: str,
    trace_id: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, trace_id), status_code=status_code, headers=headers
    )


def field_path(location: Iterable[int | str]) -> str:
    """`("tasks", 3, "callback_url")` as `tasks[3].callback_url`."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN_INPUT else text[: _MAX_SHOWN_INPUT - 3] + "..."


def describe_problem(error: ErrorDetails | Mapping[str, Any], *, prefix: str = "") -> str:
    """One validation problem as `field: what is wrong (got value)`."""
    location = list(error.get("loc", ()))
    if location and location[0] in ("body", "query", "path", "header", "cookie"):
        location = location[1:]
    field = field_path([prefix, *location] if prefix else location) or "body"
    kind = error.get("type", "")
    message = str(error.get("msg", "is invalid"))
    if kind == "missing":
        return f"{field}: is required"
    if kind == "extra_forbidden":
        return f"{field}: is not a known field; see the request schema at /docs"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{field}: must be a JSON object (got {_shown(error.get('input'))})"
    if kind == "string_pattern_mismatch" and field == "cursor":
        message = (
            "is not a cursor of this listing; pass the `next_cursor` of the previous page "
            "unchanged, or leave it out for the first page"
        )
    elif kind == "string_pattern_mismatch":
        pattern = (error.get("ctx") or {}).get("pattern", "")
        message = f"must match the pattern {pattern}"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    else:
        message = message[:1].lower() + message[1:]
    if "(got " not in message:
        message += f" (got {_shown(error.get('input'))})"
    return f"{field}: {message}"


def validation_message(
    errors: Sequence[ErrorDetails | Mapping[str, Any]], *, prefix: str = ""
) -> str:
    """Every problem of a validation error, `; `-separated, the first few in full."""
    problems = [describe_problem(error, prefix=prefix) for error in errors[:_MAX_PROBLEMS]]
    if len(errors) > _MAX_PROBLEMS:
        problems.append(f"and {len(errors) - _MAX_PROBLEMS} more problems")
    return "; ".join(problems) or "the request is not valid"


def status_for(exc: TrackerError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, InvalidQuery):
        return 422
    return 500


async def _tracker_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TrackerError)
    status = status_for(exc)
    if status == 500:
        raise exc  # not a client's mistake: the middleware logs it and answers 500
    return error_response(status, exc.code, exc.message, trace_id_of(request))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    invalid_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if invalid_json is not None:
        reason = (invalid_json.get("ctx") or {}).get("error", "not JSON")
        position = invalid_json.get("loc", ("body", "?"))[-1]
        message = (
            f"body: is not valid JSON ({reason} at character {position}); "
            "send a JSON object with content-type application/json"
        )
        return error_response(400, "invalid_json", message, trace_id_of(request))
    # The cursor's form is stated in the OpenAPI document and checked by FastAPI; a bad one
    # keeps its own code, as when the listing refuses it.
    code = INVALID_CURSOR if any(e.get("loc") == ("query", "cursor") for e in errors) else None
    return error_response(
        422, code or VALIDATION_ERROR, validation_message(errors), trace_id_of(request)
    )


def allowed_methods(request: Request) -> str:
    """Every method of the routes whose path matches this one, as the router matches paths
    (with their convertors: `/v1/tasks/batch` is not a task id), so `Allow` lists exactly
    what the OpenAPI document gives this path (Starlette names only one route's)."""
    path = request.scope.get("path", request.url.path)
    methods: set[str] = set()
    for route in _routes(request.app.router.routes):
        if route.methods and route.path_regex.match(path):
            methods |= route.methods
    return ", ".join(sorted(methods))


def _routes(routes: Iterable[BaseRoute]) -> Iterator[Route]:
    """Every route, those of included routers too (they carry their full paths)."""
    for route in routes:
        if isinstance(route, Route):
            yield route
        included = getattr(route, "original_router", None)  # FastAPI's include_router
        if included is not None:
            yield from _routes(included.routes)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    headers = exc.headers
    if isinstance(exc, ApiError):
        code, message = exc.code, exc.message
    elif status == 404:
        code, message = "not_found", f"no route {request.url.path}; the routes are listed at /docs"
    elif status == 405:
        allowed = allowed_methods(request)
        headers = {**(headers or {}), "Allow": allowed}
        code = "method_not_allowed"
        message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
    elif status == 400:
        code = "invalid_json"
        message = "body: is not valid JSON in UTF-8; send a JSON object"
    else:
        code = _CODE_FOR_STATUS.get(status, "http_error")
        message = str(exc.detail)
    return error_response(status, code, message, trace_id_of(request), headers=headers)


# Seconds a client is asked to wait when the database cannot be reached.
DATABASE_RETRY_AFTER = 2


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Nothing was committed: the request can be sent again as it is (registrations are
    # idempotent). The fault suite restarts PostgreSQL under load and expects no 500.
    message = (
        "the database cannot be reached right now (restarting or down); nothing was saved, "
        "send the request again in a few seconds. /readyz shows the database's state"
    )
    return error_response(
        503,
        "database_unavailable",
        message,
        trace_id_of(request),
        headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
    )


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the one answer shape."""
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(TrackerError, _tracker_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these error statuses, all with the error body."""
    described = {
        400: "The body is not JSON (`invalid_json`).",
        401: "No or an unknown API key (`invalid_api_key`).",
        404: "No such resource for this client.",
        409: "A conflict with the current state; the message says which.",
        405: "The path exists with other methods, listed in `Allow` (`method_not_allowed`).",
        413: "The body is larger than 1 MiB (`payload_too_large`).",
        422: "A parameter or field is invalid; the message names it (`validation_error`).",
        503: "The database cannot be reached; nothing was saved, retry (`database_unavailable`).",
        500: "An unexpected error; quote the trace id when reporting it.",
    }
    return {status: {"model": ErrorBody, "description": described[status]} for status in statuses}
