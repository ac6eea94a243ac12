"""`/v1/deliveries`: the calling client's webhook deliveries, their attempts, and a manual retry.

A retry only makes the delivery due again; the next sweep sends it (nothing runs inline).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from tracker.api.deps import CurrentClient, request_transaction
from tracker.api.errors import error_responses
from tracker.api.resources import DeliveryDetail, DeliveryPage, DeliveryStatus
from tracker.clock import utcnow
from tracker.db.queries import (
    DEFAULT_PAGE_SIZE,
    DELIVERIES_CURSOR_PATTERN,
    MAX_PAGE_SIZE,
    delivery_detail,
    delivery_resource,
    get_delivery,
    list_deliveries,
)
from tracker.delivery.outbox import redeliver
from tracker.tracking.schemas import TASK_ID_PATTERN

DELIVERY_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"

router = APIRouter(
    prefix="/v1/deliveries", tags=["deliveries"], responses=error_responses(401, 500)
)

DeliveryIdPath = Annotated[
    str,
    Path(
        pattern=DELIVERY_ID_PATTERN,
        max_length=64,
        description="The delivery id, as sent in the `webhook-id` header.",
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


@router.get(
    "/{delivery_id}",
    response_model=DeliveryDetail,
    summary="Show a delivery with every attempt",
    responses=error_responses(404, 422),
)
def show(delivery_id: DeliveryIdPath, request: Request, client: CurrentClient) -> dict[str, Any]:
    """One delivery: its payload and every attempt, first first."""
    with request_transaction(request) as session:
        return delivery_detail(get_delivery(session, delivery_id, client_id=client.id))


@router.post(
    "/{delivery_id}/retry",
    status_code=202,
    response_model=DeliveryDetail,
    summary="Deliver again now",
    responses={
        202: {"description": "Due again now; the next sweep sends it, with the same webhook-id."},
        **error_responses(404, 409, 422),
    },
)
def retry(delivery_id: DeliveryIdPath, request: Request, client: CurrentClient) -> dict[str, Any]:
    """Make the delivery due again now, also after it failed for good; the same `webhook-id`."""
    with request_transaction(request) as session:
        redeliver(session, delivery_id, client_id=client.id, now=utcnow())
        return delivery_detail(get_delivery(session, delivery_id, client_id=client.id))
