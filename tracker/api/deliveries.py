"""`/v1/deliveries`: the calling client's webhook deliveries, their attempts, and a manual retry.

A retry only makes the delivery due again; the next sweep sends it (nothing runs inline).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor

from tracker.api.deps import CurrentClient, request_transaction
from tracker.api.errors import error_responses
from tracker.api.resources import DeliveryDetail, DeliveryPage, DeliveryStatus, ReplayResult
from tracker.clock import utcnow
from tracker.db.queries import (
    DEFAULT_PAGE_SIZE,
    DELIVERIES_CURSOR_PATTERN,
    MAX_PAGE_SIZE,
    as_utc,
    delivery_detail,
    delivery_resource,
    get_delivery,
    list_deliveries,
)
from tracker.delivery.outbox import redeliver
from tracker.delivery.replay import ReplayFilter, replay_deliveries
from tracker.tracking.schemas import SERVICE_PATTERN, TASK_ID_PATTERN, DateTimeWithZone

ReplayEvent = Literal[
    "task.running",
    "task.completed",
    "task.failed",
    "task.timed_out",
    "delivery.failing",
    "delivery.exhausted",
    "destination.opened",
    "destination.disabled",
    "destination.recovered",
]

DELIVERY_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"

router = APIRouter(
    prefix="/v1/deliveries", tags=["deliveries"], responses=error_responses(401, 500)
)

REPLAY_SEGMENT = "replay"


class DeliveryIdConvertor(Convertor[str]):
    """A `/v1/deliveries/{delivery_id}` path segment: any segment but the replay route's, so
    `Allow` on `/v1/deliveries/replay` lists only what that path allows."""

    regex = f"(?!{REPLAY_SEGMENT}$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("delivery_id", DeliveryIdConvertor())

DeliveryIdPath = Annotated[
    str,
    Path(
        pattern=DELIVERY_ID_PATTERN,
        max_length=64,
        description="The delivery id, as sent in the `webhook-id` header.",
        json_schema_extra={"not": {"const": REPLAY_SEGMENT}},
    ),
]


@router.get(
    "", response_model=DeliveryPage, summary="List deliveries", responses=error_responses(422)
)
def list_(
    request: Request,
    client: CurrentClient,
    status: Annotated[
        DeliveryStatus | None, Query(description="Only deliveries in this status.")
    ] = None,
    task_id: Annotated[
        str | None,
        Query(pattern=TASK_ID_PATTERN, max_length=128, description="Only this task's deliveries."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Deliveries per page.")] = (
        DEFAULT_PAGE_SIZE
    ),
    cursor: Annotated[
        str | None,
        Query(
            pattern=DELIVERIES_CURSOR_PATTERN,
            max_length=128,
            description="`next_cursor` of the previous page, unchanged.",
        ),
    ] = None,
) -> dict[str, Any]:
    """The client's webhook deliveries, newest first, a page at a time."""
    with request_transaction(request) as session:
        page = list_deliveries(
            session, client_id=client.id, status=status, task_id=task_id, limit=limit, cursor=cursor
        )
        items = [delivery_resource(d) for d in page.items]
        return {"items": items, "next_cursor": page.next_cursor}


class ReplayRequest(BaseModel):
    """Which deliveries to send again: created in [since, until], and the filters given."""

    model_config = ConfigDict(extra="forbid")

    since: DateTimeWithZone = Field(description="Only deliveries created at or after (required).")
    until: DateTimeWithZone | None = Field(
        None, description="Only deliveries created at or before."
    )
    status: DeliveryStatus | None = Field(None, description="Only deliveries in this status.")
    event: ReplayEvent | None = Field(None, description="Only deliveries of this event.")
    service: str | None = Field(None, pattern=SERVICE_PATTERN, description="Only this service.")
    task_id: str | None = Field(
        None, pattern=TASK_ID_PATTERN, max_length=128, description="Only this task's."
    )


@router.post(
    "/replay",
    status_code=202,
    response_model=ReplayResult,
    summary="Deliver again every delivery matching a filter",
    responses={
        202: {"description": "Due again now, each with its own webhook-id."},
        **error_responses(400, 422),
    },
)
def replay(body: ReplayRequest, request: Request, client: CurrentClient) -> dict[str, Any]:
    """Every delivery created in [`since`, `until`] matching the filters, at most 10,000
    (more: 422, narrow the range), is pending and due now with the same `webhook-id`;
    replaying again before it is sent leaves it one pending delivery. Superseded ones, and
    older events of a task whose newer event is not replayed too, are not sent. The
    disabled destinations of what is replayed are open to attempts again."""
    wanted = ReplayFilter(
        since=as_utc(body.since, name="since"),
        until=None if body.until is None else as_utc(body.until, name="until"),
        status=body.status,
        event=body.event,
        service=body.service,
        task_id=body.task_id,
    )
    with request_transaction(request) as session:
        return {"replayed": replay_deliveries(session, wanted, client_id=client.id, now=utcnow())}


@router.get(
    "/{delivery_id:delivery_id}",
    response_model=DeliveryDetail,
    summary="Show a delivery with every attempt",
    responses=error_responses(404, 405, 422),
)
def show(delivery_id: DeliveryIdPath, request: Request, client: CurrentClient) -> dict[str, Any]:
    """One delivery: its payload and every attempt, first first."""
    with request_transaction(request) as session:
        return delivery_detail(get_delivery(session, delivery_id, client_id=client.id))


@router.post(
    "/{delivery_id:delivery_id}/retry",
    status_code=202,
    response_model=DeliveryDetail,
    summary="Deliver again now",
    responses={
        202: {"description": "Due again now; the next sweep sends it, with the same webhook-id."},
        **error_responses(404, 405, 409, 422),
    },
)
def retry(delivery_id: DeliveryIdPath, request: Request, client: CurrentClient) -> dict[str, Any]:
    """Make the delivery due again now, also after it failed for good; the same `webhook-id`."""
    with request_transaction(request) as session:
        redeliver(session, delivery_id, client_id=client.id, now=utcnow())
        return delivery_detail(get_delivery(session, delivery_id, client_id=client.id))
