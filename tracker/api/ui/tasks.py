"""Dashboard pages of tasks: the listing (filters, paging, live states) and one task.

The listing reads the same page as `GET /v1/tasks` (`tracker.db.queries.list_tasks`,
keyset paging); one task reads what `GET /v1/tasks/{task_id}` reads, plus the attempts
of its deliveries in one more query. The live route answers the states of the rows a
page shows, by row id, for the client's rows only: the page's script polls it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from tracker.api.ui.auth import signed_in
from tracker.api.ui.common import context, not_found
from tracker.api.ui.render import page
from tracker.clock import isoformat_z
from tracker.db.models import Task
from tracker.db.queries import (
    DEFAULT_PAGE_SIZE,
    attempts_by_delivery,
    get_task,
    list_tasks,
    task_detail,
    task_resource,
)
from tracker.errors import InvalidQuery, TaskNotFound
from tracker.states import ACTIVE_STATES, TASK_STATES
from tracker.tracking.schemas import SERVICE_PATTERN, TASK_ID_PATTERN

router = APIRouter(prefix="/ui", include_in_schema=False)

# The live route answers at most this many rows: a page shows at most DEFAULT_PAGE_SIZE.
MAX_LIVE_ROWS = 200
# Seconds between two polls of the live route by a page's script.
LIVE_INTERVAL_SECONDS = 2

STATE_ORDER = ("pending", "running", "completed", "failed", "timed_out", "cancelled")


@router.get("/tasks")
def tasks_page(
    request: Request,
    state: str = "",
    service: str = "",
    cursor: str = "",
) -> Response:
    """The client's tasks, newest first, a page at a time; active rows update live."""
    problems = []
    if state and state not in TASK_STATES:
        problems.append(f"state: must be one of {', '.join(STATE_ORDER)} (got {state[:40]!r})")
        state = ""
    if service and not re.fullmatch(SERVICE_PATTERN.strip("^$"), service):
        problems.append(f"service: must be 1-32 of a-z, 0-9 and - (got {service[:40]!r})")
        service = ""
    with signed_in(request) as (session, client, token):
        try:
            listing = list_tasks(
                session,
                client_id=client.id,
                state=state or None,
                service=service or None,
                limit=DEFAULT_PAGE_SIZE,
                cursor=cursor or None,
            )
        except InvalidQuery:
            problems.append("that page link is no longer valid; showing the first page")
            cursor = ""
            listing = list_tasks(
                session,
                client_id=client.id,
                state=state or None,
                service=service or None,
                limit=DEFAULT_PAGE_SIZE,
            )
        rows = [(task.id, task_resource(task)) for task in listing.items]
        values = context(
            request,
            client,
            token,
            title="Tasks",
            nav="tasks",
            rows=rows,
            states=STATE_ORDER,
            state=state,
            service=service,
            cursor=cursor,
            next_cursor=listing.next_cursor,
            problems=problems,
            active_states=sorted(ACTIVE_STATES),
            live_interval=LIVE_INTERVAL_SECONDS,
        )
    return page("tasks.html", values, status_code=422 if problems and not rows else 200)


@router.get("/tasks/{task_id}")
def task_page(request: Request, task_id: str, service: str = "luma") -> Response:
    """One task: its timeline, outputs, record, and each delivery with every attempt."""
    with signed_in(request) as (session, client, token):
        valid = re.fullmatch(TASK_ID_PATTERN.strip("^$"), task_id) and re.fullmatch(
            SERVICE_PATTERN.strip("^$"), service
        )
        try:
            if not valid:
                raise TaskNotFound(f"no task {task_id[:140]!r} of service {service[:40]!r}")
            task = get_task(session, task_id, service=service, client_id=client.id)
        except TaskNotFound:
            return not_found(
                request,
                client,
                token,
                f"No task {task_id[:140]!r} of service {service[:40]!r} is tracked for "
                f"{client.name}. Check the id and the service.",
            )
        detail = task_detail(task)
        attempts = attempts_by_delivery(session, [d["id"] for d in detail["deliveries"]])
        values = context(
            request,
            client,
            token,
            title=f"Task {task_id}",
            nav="tasks",
            row_id=task.id,
            task=detail,
            outputs=detail.get("outputs") or [],
            attempts=attempts,
            active=task.state in ACTIVE_STATES,
            live_interval=LIVE_INTERVAL_SECONDS,
        )
    return page("task.html", values)


@router.get("/live/tasks")
def live_tasks(
    request: Request, id: Annotated[list[str] | None, Query(max_length=MAX_LIVE_ROWS)] = None
) -> JSONResponse:
    """The current state of the client's tasks with these row ids (others are left out)."""
    row_ids = [int(value) for value in (id or []) if value.isdigit() and len(value) < 19]
    with signed_in(request) as (session, client, _token):
        rows = session.execute(
            select(
                Task.id, Task.state, Task.upstream_state, Task.updated_at, Task.finished_at
            ).where(Task.client_id == client.id, Task.id.in_(row_ids))
        ).all()
    tasks: dict[str, Any] = {
        str(row.id): {
            "state": row.state,
            "upstream_state": row.upstream_state,
            "updated_at": isoformat_z(row.updated_at),
            "finished_at": isoformat_z(row.finished_at),
        }
        for row in rows
    }
    return JSONResponse({"tasks": tasks}, headers={"Cache-Control": "no-store"})
