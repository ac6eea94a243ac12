"""The API's response bodies as pydantic models, so `/openapi.json` describes every answer.

The dicts themselves are built by the serialisers in `tracker.db.queries`, shared
with the CLI's `--json`; these models only describe (and check) them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)

TaskState = Literal["pending", "running", "completed", "failed", "timed_out", "cancelled"]
DeliveryStatus = Literal["pending", "succeeded", "failed", "superseded"]


class Resource(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FailureResource(Resource):
    """Why a task failed, or why a delivery gave up."""

    code: str
    message: str


class ErrorDetail(Resource):
    code: str = Field(description="What went wrong, in snake_case, e.g. `validation_error`.")
    message: str = Field(description="What is wrong and how to fix it; names the field.")


class ErrorBody(Resource):
    """Every error answer."""

    error: ErrorDetail
    trace_id: str = Field(description="Also in the `x-trace-id` header and the server's log.")


class Output(Resource):
    """One artifact of a finished task, whatever the service."""

    type: Literal["video", "audio", "image", "file"]
    url: str
    thumbnail_url: str | None = None
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    title: str | None = None

    @model_serializer(mode="wrap")
    def _what_the_service_gives(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The same shape as in webhooks: details the service does not give are left out.
        fields: dict[str, Any] = handler(self)
        return {key: value for key, value in fields.items() if value is not None}


class TaskResource(Resource):
    task_id: str
    service: str
    state: TaskState
    upstream_state: str | None = Field(description="The upstream's own word for the state.")
    callback_url: str | None
    metadata: dict[str, Any]
    events: list[str]
    created_at: str
    updated_at: str
    finished_at: str | None
    deadline_at: str
    polls: int
    failure: FailureResource | None
    progress: int | None = Field(
        description="How far the upstream says the task is, 0-100, where the service reports it."
    )
    outputs: list[Output] = Field(
        description="The artifacts, in one shape for every service; `[]` until completed."
    )
    profile: str = Field(
        description="The rules the task's records are read by: its service, or `generic`."
    )
    record: dict[str, Any] | None = Field(description="The last upstream task record.")


class Transition(Resource):
    from_state: TaskState | None
    to_state: TaskState
    upstream_state: str | None
    observed_at: str


class DeliverySummary(Resource):
    id: str = Field(description="The `webhook-id` header: the same on every attempt.")
    event: str
    status: DeliveryStatus
    attempts: int = Field(description="Attempts made so far.")
    next_attempt_at: str | None
    delivered_at: str | None
    last_status_code: int | None
    failure: FailureResource | None


class TaskDetail(TaskResource):
    transitions: list[Transition] = Field(description="Every state change, oldest first.")
    deliveries: list[DeliverySummary]


class TaskPage(Resource):
    items: list[TaskResource]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last.")


class TaskRegistered(Resource):
    status: Literal[200, 201] = Field(description="201 registered now, 200 registered already.")
    task: TaskResource


class TaskRejected(Resource):
    status: Literal[409, 422]
    error: ErrorDetail


class BatchResult(Resource):
    items: list[TaskRegistered | TaskRejected] = Field(
        description="One result per registration, in the order sent."
    )


class DeliveryResource(DeliverySummary):
    task_id: str | None = Field(description="Null for an operational event (no task).")
    service: str | None = Field(description="Null for an operational event (no task).")
    callback_url: str
    created_at: str
    updated_at: str


class DeliveryPage(Resource):
    items: list[DeliveryResource]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: last.")


class Attempt(Resource):
    attempt: int
    started_at: str
    duration_ms: int
    status_code: int | None
    response_excerpt: str | None = Field(description="The first 2 KiB of the answer.")
    error: str | None


class DeliveryDetail(Resource):
    """A delivery with its body and every attempt; `attempt_count` is the number of attempts."""

    id: str = Field(description="The `webhook-id` header: the same on every attempt.")
    event: str
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: str | None
    delivered_at: str | None
    last_status_code: int | None
    failure: FailureResource | None
    task_id: str | None = Field(description="Null for an operational event (no task).")
    service: str | None = Field(description="Null for an operational event (no task).")
    callback_url: str
    created_at: str
    updated_at: str
    payload: dict[str, Any] = Field(description="The webhook body, the same on every attempt.")
    attempts: list[Attempt] = Field(description="Every attempt, first first.")


class SubmitResult(Resource):
    """A submission the vendor accepted, and the task registered for it."""

    upstream: dict[str, Any] = Field(description="The vendor's answer, as it came.")
    task: TaskResource


class UpstreamErrorDetail(ErrorDetail):
    upstream: Any = Field(None, description="The vendor's answer, as it came, if there was one.")


class UpstreamErrorBody(Resource):
    """An error of a submission, with the vendor's answer when there was one."""

    error: UpstreamErrorDetail
    trace_id: str


class AceDataErrorDetail(Resource):
    code: str = Field(description="The vendor's code, e.g. `bad_request`, `invalid_token`.")
    message: str


class AceDataError(Resource):
    """An error of the AceData-compatible route, in the vendor's own body."""

    success: Literal[False]
    error: AceDataErrorDetail
    trace_id: str


class Health(Resource):
    status: Literal["ok"]


class Readiness(Resource):
    status: Literal["ready", "unready"]
    checks: dict[str, str] = Field(
        description="Per dependency (database, broker, upstream_credentials): `ok` or the reason."
    )
    detail: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Problems that do not make the tracker unready, e.g. `client NAME`: that client's "
            "own upstream token is rejected (only its polling pauses)."
        ),
    )


class ServiceResource(Resource):
    """A task service the tracker knows: how its records are read."""

    service: str
    endpoint: str = Field(description="The upstream task endpoint polled, e.g. `/suno/tasks`.")
    progress: bool = Field(description="Whether its tasks report `progress`.")
    outputs: list[Literal["video", "audio", "image", "file"]] = Field(
        description="The kinds of artifact its tasks' `outputs` hold."
    )


class ServicePage(Resource):
    items: list[ServiceResource]


DestinationState = Literal["healthy", "open", "disabled"]


class DestinationResource(Resource):
    """A callback destination of the client (scheme, host, port) and its circuit breaker."""

    id: int = Field(description="Pass to `POST /v1/destinations/{id}/resume`.")
    url: str = Field(description="`scheme://host:port`.")
    scheme: str
    host: str
    port: int | None
    state: DestinationState = Field(
        description="`healthy`: attempts flow; `open`: deliveries held, one probe per "
        "TRACKER_DESTINATION_PROBE s; `disabled`: deliveries end failed until resumed."
    )
    consecutive_failures: int = Field(description="Failed attempts since the last success.")
    last_success_at: str | None
    failing_since: str | None = Field(description="The first failure since the last success.")
    last_error: str | None
    opened_at: str | None
    next_probe_at: str | None
    disabled_at: str | None
    held_deliveries: int = Field(
        description="Deliveries pending to this destination (held while it is open)."
    )


class DestinationList(Resource):
    items: list[DestinationResource]


class ReplayResult(Resource):
    replayed: int = Field(
        description="Deliveries pending and due now, each with its own `webhook-id`."
    )


class ClientSettingsResource(Resource):
    """The calling client's own settings."""

    name: str
    default_callback_url: str | None = Field(
        description="Taken by registrations that leave `callback_url` out."
    )
    default_events: list[str] | None = Field(
        description="Taken by registrations that leave `events` out."
    )
    operations_url: str | None = Field(
        description="Where operational events (delivery.failing, destination.opened, ...) go."
    )
