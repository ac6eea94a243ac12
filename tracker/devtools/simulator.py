"""The simulator: a local stand-in for AceData's task APIs (docs/simulator.md).

Upstream routes, as AceData answers them (records: `tracker.devtools.simulator_records`):

    POST /{service}/tasks   {"id": ID, "action": "retrieve"}          -> one record
                            {"ids": [...], "action": "retrieve_batch"} -> {"items", "count"}
    POST /{service}/<any>   a generation call, e.g. /luma/videos: creates a task
                            from the body -> {"success": true, "task_id", "trace_id"}

An unknown id answers `{}` (or a 404 `not_found` body, knob `unknown_retrieve`);
errors use the vendor's body `{"success": false, "error": {"code", "message"},
"trace_id"}`: 400 `bad_request`, 401 `invalid_token`, 429 `too_many_requests`
(with Retry-After), 500 `api_error`.

Admin routes (no auth), for tests, benchmarks and curious users:

    GET  /_sim/stats              counters: requests by action and HTTP status,
                                  retrieve_batch calls, ids asked (items_requested) and
                                  records answered (items_answered) by served calls,
                                  over_budget (429s of rate_limit_rps),
                                  max_rate_per_second (any sliding second), tasks by phase
    GET  /_sim/config             the knobs in force
    PUT  /_sim/config             change knobs: a JSON object of `SimulatorConfig` fields
    POST /_sim/tasks              seed tasks: {"tasks": [{"id", "service", "outcome",
                                  "duration", "prompt", "age"}, ...]}, every field
                                  optional (`age`: seconds since it was created)
                                  -> {"ids": [...]}
    GET  /_sim/tasks              every task: id, service, outcome, phase, settled_at
    GET  /_sim/tasks/{id}         one task with its current record
    POST /_sim/tasks/{id}/finish  {"outcome": "completed" | "failed"}: settle it now
    POST /_sim/reset              forget tasks and counters, restore start-up knobs

State lives in memory behind one lock; the server is a single process.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import uvicorn
from fastapi import Body, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from tracker.devtools.simulator_records import Settled, error_body
from tracker.devtools.simulator_state import Fault, SimulatorConfig, SimulatorState, TaskSeed

__all__ = ["SimulatorConfig", "create_app", "serve", "serving_in_thread"]

MALFORMED_BODY = "<html><body><h1>502 Bad Gateway</h1></body></html>"


class TaskSeeds(BaseModel):
    """The body of `POST /_sim/tasks`."""

    tasks: list[TaskSeed]


class Finish(BaseModel):
    """The body of `POST /_sim/tasks/{id}/finish`."""

    outcome: Settled = "completed"


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def create_app(config: SimulatorConfig | None = None) -> FastAPI:
    """The simulator as an ASGI app; `config` holds its start-up knobs."""
    state = SimulatorState(config or SimulatorConfig())
    app = FastAPI(title="tracker simulator", description=__doc__ or "")
    app.state.simulator = state

    @app.middleware("http")
    async def count_statuses(request: Request, call_next: Any) -> Response:
        epoch = state.epoch
        response: Response = await call_next(request)
        if not request.url.path.startswith("/_sim/"):
            state.count_status(response.status_code, epoch)
        return response

    @app.get("/_sim/stats")
    def stats() -> dict[str, Any]:
        return state.stats()

    @app.get("/_sim/config")
    def show_config() -> SimulatorConfig:
        return state.config

    @app.put("/_sim/config", response_model=None)
    def change_config(
        changes: Annotated[dict[str, Any], Body()],
    ) -> SimulatorConfig | JSONResponse:
        try:
            return state.reconfigure(changes)
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False)
            return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)

    @app.post("/_sim/tasks")
    def seed_tasks(seeds: TaskSeeds) -> JSONResponse:
        # A JSONResponse skips FastAPI's encoder, which is slow on 100,000 ids.
        return JSONResponse({"ids": state.seed(seeds.tasks)})

    @app.get("/_sim/tasks")
    def list_tasks() -> JSONResponse:
        return JSONResponse({"items": state.task_views()})

    @app.get("/_sim/tasks/{task_id}", response_model=None)
    def show_task(task_id: str) -> dict[str, Any] | JSONResponse:
        view = state.task_view(task_id)
        return view if view is not None else _no_task(task_id)

    @app.post("/_sim/tasks/{task_id}/finish", response_model=None)
    def finish_task(task_id: str, finish: Finish) -> dict[str, Any] | JSONResponse:
        view = state.finish(task_id, finish.outcome)
        return view if view is not None else _no_task(task_id)

    @app.post("/_sim/reset")
    def reset() -> dict[str, bool]:
        state.clear(state.initial_config)
        return {"reset": True}

    @app.post("/{service}/{endpoint}")
    async def upstream_call(service: str, endpoint: str, request: Request) -> Response:
        body = _json_object(await request.body())
        action = "generate" if endpoint != "tasks" else _action_of(body)
        fault = state.admit(_bearer_token(request), action)
        if state.config.latency:
            await asyncio.sleep(state.config.latency)
        if fault is not None:
            return _fault_response(fault)
        if body is None:
            return vendor_error(400, "bad_request", "The body must be a JSON object.")
        if endpoint != "tasks":
            task = state.generate(service, body)
            return JSONResponse({"success": True, "task_id": task.id, "trace_id": task.trace_id})
        if action == "retrieve" and isinstance(body.get("id"), str):
            record = state.record(service, body["id"])
            if record is not None:
                return JSONResponse(record)
            if state.config.unknown_retrieve == "404":
                return vendor_error(404, "not_found", f"No task {body['id']!r}.")
            return JSONResponse({})
        ids = body.get("ids")
        if action == "retrieve_batch" and isinstance(ids, list):
            limit = body.get("limit")
            limit = limit if isinstance(limit, int) and not isinstance(limit, bool) else None
            items = state.records(service, [i for i in ids if isinstance(i, str)], limit=limit)
            return JSONResponse({"items": items, "count": len(items)})
        return vendor_error(
            400,
            "bad_request",
            'Use {"id": ID, "action": "retrieve"} or {"ids": [...], "action": "retrieve_batch"}.',
        )

    return app


def vendor_error(
    status: int, code: str, message: str, *, retry_after: int | str | None = None
) -> JSONResponse:
    """An error answered with AceData's body, and a Retry-After header when given."""
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    body = error_body(code, message, str(uuid.uuid4()))
    return JSONResponse(body, status_code=status, headers=headers)


def _fault_response(fault: Fault) -> Response:
    if fault.kind == "redirect":
        return Response(status_code=fault.status, headers={"location": fault.location or "/"})
    if fault.kind == "malformed":
        return Response(MALFORMED_BODY, status_code=fault.status, media_type="text/html")
    return vendor_error(fault.status, fault.code, fault.message, retry_after=fault.retry_after)


def _no_task(task_id: str) -> JSONResponse:
    return JSONResponse({"detail": f"no task {task_id!r}"}, status_code=404)


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _action_of(body: dict[str, Any] | None) -> str:
    action = (body or {}).get("action")
    return action if isinstance(action, str) else "none"


def serve(host: str = "127.0.0.1", port: int = 8099, config: SimulatorConfig | None = None) -> None:
    """Run the simulator until interrupted."""
    uvicorn.run(create_app(config), host=host, port=port, access_log=False, ws="none")


@contextmanager
def serving_in_thread(
    config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[str]:
    """Serve the simulator from a background thread; yields its base URL (port 0: any free)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config), log_level="warning", access_log=False, ws="none", lifespan="off"
        )
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="simulator", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10.0
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the simulator did not start on {host}:{port}")
        time.sleep(0.005)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)
        sock.close()
