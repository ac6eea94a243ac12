"""`/v1/tasks`: register (one or a batch), list, show and cancel the calling client's tasks.

Registering only writes rows: the new task is due for a poll at once and the
beat's next tick finds it (the database is the truth; nothing runs inline).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.convertors import Convertor, register_url_convertor

from tracker.api.deps import CurrentClient, SettingsDep, request_transaction
from tracker.api.errors import VALIDATION_ERROR, error_responses, validation_message
from tracker.api.resources import BatchResult, TaskDetail, TaskPage, TaskResource, TaskState
from tracker.clock import utcnow
from tracker.db.queries import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    TASKS_CURSOR_PATTERN,
    get_task,
    list_tasks,
    task_detail,
    task_resource,
)
from tracker.errors import RegistrationConflict
from tracker.tracking.registration import cancel_task, register_task
from tracker.tracking.schemas import (
    SERVICE_PATTERN,
    TASK_ID_PATTERN,
    DateTimeWithZone,
    TaskRegistration,
)

MAX_BATCH = 1000
BATCH_SEGMENT = "batch"


class TaskIdConvertor(Convertor[str]):
    """A `/v1/tasks/{task_id}` path segment: any segment but the batch route's."""

    regex = f"(?!{BATCH_SEGMENT}$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("task_id", TaskIdConvertor())

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], responses=error_responses(401, 500))

# `/v1/tasks/batch` is the batch route, whatever the method: a literal path segment wins
# over a parameter (the `task_id` path convertor never matches it), so the schema and the
# routing agree on what that path allows.
TaskIdPath = Annotated[
    str,
    Path(
        pattern=TASK_ID_PATTERN,
        description="The upstream task id (`batch` names the batch route).",
        max_length=128,
        json_schema_extra={"not": {"const": BATCH_SEGMENT}},
    ),
]
ServiceQuery = Annotated[
    str, Query(pattern=SERVICE_PATTERN, max_length=32, description="The upstream service.")
]


class BatchRegistration(BaseModel):
    """Up to 1000 registrations, each checked on its own: a bad one does not stop the rest."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[Any] = Field(
        max_length=MAX_BATCH,
        description=(
            "Task registrations, each shaped like the body of `POST /v1/tasks` "
            "(TaskRegistration); an invalid one answers a 422 item."
        ),
    )


@router.post(
    "",
    status_code=201,
    response_model=TaskResource,
    summary="Register a task",
    responses={
        200: {"model": TaskResource, "description": "The same registration existed already."},
        201: {"description": "Registered; the task is polled from now on."},
        **error_responses(400, 409, 413, 422),
    },
)
def register(
    registration: TaskRegistration,
    request: Request,
    client: CurrentClient,
    settings: SettingsDep,
    response: Response,
) -> dict[str, Any]:
    """Start tracking a task: 201 new, 200 for a repeat of the same registration, else 409."""
    with request_transaction(request) as session:
        result = register_task(session, client, registration, settings=settings)
        if not result.created:
            response.status_code = 200
        return task_resource(result.task)


@router.post(
    "/batch",
    response_model=BatchResult,
    summary="Register up to 1000 tasks",
    responses=error_responses(400, 413, 422),
)
def register_batch(
    batch: BatchRegistration, request: Request, client: CurrentClient, settings: SettingsDep
) -> dict[str, Any]:
    """Register many tasks in one transaction, with one result per item, in order."""
    items: list[dict[str, Any]] = []
    with request_transaction(request) as session:
        for index, raw in enumerate(batch.tasks):
            try:
                registration = TaskRegistration.model_validate(raw)
            except ValidationError as exc:
                message = validation_message(exc.errors(), prefix=f"tasks[{index}]")
                error = {"code": VALIDATION_ERROR, "message": message}
                items.append({"status": 422, "error": error})
                continue
            try:
                result = register_task(session, client, registration, settings=settings)
            except RegistrationConflict as exc:
                message = f"tasks[{index}]: {exc.message}"
                items.append({"status": 409, "error": {"code": exc.code, "message": message}})
                continue
            task = task_resource(result.task)
            items.append({"status": 201 if result.created else 200, "task": task})
    return {"items": items}


@router.get("", response_model=TaskPage, summary="List tasks", responses=error_responses(422))
def list_(
    request: Request,
    client: CurrentClient,
    state: Annotated[TaskState | None, Query(description="Only tasks in this state.")] = None,
    service: Annotated[
        str | None, Query(pattern=SERVICE_PATTERN, max_length=32, description="Only this service.")
    ] = None,
    created_after: Annotated[
        DateTimeWithZone | None,
        Query(description="Only tasks created after this time (RFC 3339, with its zone)."),
    ] = None,
    created_before: Annotated[
        DateTimeWithZone | None,
        Query(description="Only tasks created before this time (RFC 3339, with its zone)."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Tasks per page.")] = (
        DEFAULT_PAGE_SIZE
    ),
    cursor: Annotated[
        str | None,
        Query(
            pattern=TASKS_CURSOR_PATTERN,
            max_length=128,
            description="`next_cursor` of the previous page, unchanged.",
        ),
    ] = None,
) -> dict[str, Any]:
    """The client's tasks, newest first, a page at a time."""
    with request_transaction(request) as session:
        page = list_tasks(
            session,
            client_id=client.id,
            state=state,
            service=service,
            created_after=created_after,
            created_before=created_before,
            limit=limit,
            cursor=cursor,
        )
        return {"items": [task_resource(t) for t in page.items], "next_cursor": page.next_cursor}


@router.get(
    "/{task_id:task_id}",
    response_model=TaskDetail,
    summary="Show a task with its history",
    responses=error_responses(404, 405, 422),
)
def show(
    task_id: TaskIdPath, request: Request, client: CurrentClient, service: ServiceQuery = "luma"
) -> dict[str, Any]:
    """One task with its transitions (oldest first) and its webhook deliveries."""
    with request_transaction(request) as session:
        return task_detail(get_task(session, task_id, service=service, client_id=client.id))


@router.delete(
    "/{task_id:task_id}",
    response_model=TaskResource,
    summary="Stop tracking a task",
    responses=error_responses(404, 405, 422),
)
def cancel(
    task_id: TaskIdPath, request: Request, client: CurrentClient, service: ServiceQuery = "luma"
) -> dict[str, Any]:
    """The task becomes `cancelled`: its history stays, no further webhook is sent."""
    with request_transaction(request) as session:
        return task_resource(cancel_task(session, client, task_id, service, now=utcnow()))
