"""What every request gets: a trace id, a body-size limit, a log line, request metrics, and a
last-resort 500.

A pure ASGI middleware (no `BaseHTTPMiddleware`): it wraps `receive` to count
body bytes as they stream in, so a body without Content-Length (chunked)
is limited too, and `send` to add the `x-trace-id` header to every answer. Metrics
are labelled by the template of the route the router matched (`/v1/tasks/{task_id}`),
never by the raw path, so that ids and unknown paths make no new series.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tracker.api.errors import ApiError, error_response
from tracker.observability.metrics import observe_api_request

logger = logging.getLogger("tracker.api")

TRACE_HEADER = "x-trace-id"
DOORBELL_PREFIX = "/v1/doorbell/"


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"body: is larger than {limit} bytes; send fewer tasks per request",
    )


class RequestContextMiddleware:
    """Trace id, body-size limit, request log line and the catch-all 500, for every request."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace_id = uuid.uuid4().hex
        scope.setdefault("state", {})["trace_id"] = trace_id
        started = time.perf_counter()
        status = 500
        response_started = False
        received = 0

        async def send_traced(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                MutableHeaders(scope=message).append(TRACE_HEADER, trace_id)
            await send(message)

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)
            return message

        try:
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                error = _too_large(self.max_body_bytes)
                response = error_response(413, error.code, error.message, trace_id)
                await response(scope, receive, send_traced)
            else:
                await self.app(scope, receive_limited, send_traced)
        except ApiError as error:  # the body limit, tripped outside FastAPI's body parsing
            if response_started:
                raise
            response = error_response(error.status_code, error.code, error.message, trace_id)
            await response(scope, receive, send_traced)
        except Exception:
            logger.exception(
                "unhandled error in %s %s (trace_id=%s)",
                scope["method"],
                scope["path"],
                trace_id,
                extra={"trace_id": trace_id},
            )
            if response_started:
                raise
            response = error_response(
                500,
                "internal_error",
                f"the tracker failed to answer this request; it is logged under trace id "
                f"{trace_id}, please quote it when reporting the problem",
                trace_id,
            )
            await response(scope, receive, send_traced)
        finally:
            seconds = time.perf_counter() - started
            duration_ms = seconds * 1000
            # The router sets the route on a (full or partial) match; its template without
            # convertors (`/v1/tasks/{task_id}`) is the label.
            route = scope.get("route")
            template = getattr(route, "path_format", None)
            observe_api_request(scope["method"], template, status, seconds)
            path = scope["path"]
            if path.startswith(DOORBELL_PREFIX):  # its token rings the task: not for logs
                path = DOORBELL_PREFIX + "[redacted]"
            logger.info(
                "%s %s -> %d in %.1f ms (trace_id=%s)",
                scope["method"],
                path,
                status,
                duration_ms,
                trace_id,
                extra={
                    "trace_id": trace_id,
                    "method": scope["method"],
                    "path": path,
                    "status": status,
                    "duration_ms": round(duration_ms, 1),
                },
            )
