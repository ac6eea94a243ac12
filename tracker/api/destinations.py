"""`/v1/destinations`: the calling client's callback destinations and their circuit breakers."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from tracker.api.deps import CurrentClient, request_transaction
from tracker.api.errors import error_responses
from tracker.api.resources import DestinationList, DestinationResource
from tracker.clock import utcnow
from tracker.delivery.destinations import list_destinations, resume_destination

router = APIRouter(
    prefix="/v1/destinations", tags=["destinations"], responses=error_responses(401, 500)
)


@router.get("", response_model=DestinationList, summary="List destinations")
def list_(request: Request, client: CurrentClient) -> dict[str, Any]:
    """Every destination (scheme, host, port) the client's webhooks have gone to, with its
    state (`healthy`, `open`, `disabled`), consecutive failures, last success and the
    deliveries it holds."""
    with request_transaction(request) as session:
        return {"items": list_destinations(session, client_id=client.id)}


@router.post(
    "/{destination_id}/resume",
    response_model=DestinationResource,
    summary="Close a destination's circuit now",
    responses=error_responses(404, 422),
)
def resume(
    destination_id: Annotated[int, Path(ge=1, le=2**63 - 1, description="The destination's `id`.")],
    request: Request,
    client: CurrentClient,
) -> dict[str, Any]:
    """`healthy` again now: the deliveries it held are due at once, and those it failed as
    `destination_disabled` are pending again (the next sweep sends them)."""
    with request_transaction(request) as session:
        destination = resume_destination(session, destination_id, client_id=client.id, now=utcnow())
        items = list_destinations(session, client_id=client.id)
        return next(item for item in items if item["id"] == destination.id)
