"""Dashboard pages of webhooks: deliveries (filters, retry, replay a range), one delivery
with every attempt, and destinations (state, resume).

Retry calls `tracker.delivery.outbox.redeliver`, as `POST /v1/deliveries/{id}/retry`
does; replay and destinations go through the delivery engine's operations
(`tracker.api.ui.operations`). Every form carries the session's CSRF token and comes back
to the page it was sent from with a notice.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response

from tracker.api.ui.auth import require_csrf, safe_next, signed_in
from tracker.api.ui.common import back_to, context, not_found, operations
from tracker.api.ui.render import page
from tracker.clock import utcnow
from tracker.db.models import WebhookDelivery
from tracker.db.queries import (
    DEFAULT_PAGE_SIZE,
    Page,
    delivery_detail,
    delivery_resource,
    get_delivery,
    list_deliveries,
)
from tracker.delivery.outbox import redeliver
from tracker.errors import Conflict, DeliveryNotFound, InvalidQuery, NotFound
from tracker.states import DELIVERY_STATUSES, EVENTS
from tracker.tracking.schemas import SERVICE_PATTERN, TASK_ID_PATTERN

router = APIRouter(prefix="/ui", include_in_schema=False)

DELIVERY_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
STATUS_ORDER = ("pending", "succeeded", "failed", "superseded")


@router.get("/deliveries")
def deliveries_page(
    request: Request, status: str = "", task_id: str = "", cursor: str = ""
) -> Response:
    """The client's deliveries, newest first, a page at a time, and the replay form."""
    problems = []
    if status and status not in DELIVERY_STATUSES:
        problems.append(f"status: must be one of {', '.join(STATUS_ORDER)} (got {status[:40]!r})")
        status = ""
    if task_id and not re.fullmatch(TASK_ID_PATTERN.strip("^$"), task_id):
        problems.append(f"task id: 1-128 of A-Z a-z 0-9 . _ : - (got {task_id[:140]!r})")
        task_id = ""
    with signed_in(request) as (session, client, token):

        def listing_after(after: str | None) -> Page[WebhookDelivery]:
            return list_deliveries(
                session,
                client_id=client.id,
                status=status or None,
                task_id=task_id or None,
                limit=DEFAULT_PAGE_SIZE,
                cursor=after,
            )

        try:
            listing = listing_after(cursor or None)
        except InvalidQuery:
            problems.append("that page link is no longer valid; showing the first page")
            cursor = ""
            listing = listing_after(None)
        values = context(
            request,
            client,
            token,
            title="Deliveries",
            nav="deliveries",
            deliveries=[delivery_resource(d) for d in listing.items],
            statuses=STATUS_ORDER,
            events=sorted(EVENTS),
            status=status,
            task_id=task_id,
            cursor=cursor,
            next_cursor=listing.next_cursor,
            problems=problems,
            here=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
        )
    return page("deliveries.html", values)


@router.get("/deliveries/{delivery_id}")
def delivery_page(request: Request, delivery_id: str) -> Response:
    """One delivery: its payload and every attempt, with a retry button."""
    with signed_in(request) as (session, client, token):
        try:
            if not DELIVERY_ID.match(delivery_id):
                raise DeliveryNotFound(delivery_id)
            delivery = delivery_detail(get_delivery(session, delivery_id, client_id=client.id))
        except DeliveryNotFound:
            return not_found(
                request,
                client,
                token,
                f"No webhook delivery {delivery_id[:80]!r} for {client.name}.",
            )
        values = context(
            request,
            client,
            token,
            title=f"Delivery {delivery_id}",
            nav="deliveries",
            delivery=delivery,
            here=f"/ui/deliveries/{delivery_id}",
        )
    return page("delivery.html", values)


@router.post("/deliveries/{delivery_id}/retry")
def retry(
    request: Request,
    delivery_id: str,
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/ui/deliveries",
) -> Response:
    """Deliver again now (`POST /v1/deliveries/{id}/retry`), then back to the page."""
    target = safe_next(next)
    with signed_in(request) as (session, client, token):
        require_csrf(token, csrf_token)
        try:
            if not DELIVERY_ID.match(delivery_id):
                raise DeliveryNotFound(delivery_id)
            redeliver(session, delivery_id, client_id=client.id, now=utcnow())
        except DeliveryNotFound:
            return not_found(
                request,
                client,
                token,
                f"No webhook delivery {delivery_id[:80]!r} for {client.name}.",
            )
        except Conflict as exc:
            return back_to(target, error=exc.code)
    return back_to(target, notice="retried")


def _utc_time(value: str, name: str, problems: list[str]) -> datetime | None:
    """A time from a form's `datetime-local` field (taken as UTC) or ISO 8601 text."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        problems.append(f"{name}: is not a time like 2026-12-01T10:00 (got {value[:40]!r})")
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@router.post("/deliveries/replay")
def replay(
    request: Request,
    csrf_token: Annotated[str, Form()] = "",
    since: Annotated[str, Form()] = "",
    until: Annotated[str, Form()] = "",
    status: Annotated[str, Form()] = "",
    event: Annotated[str, Form()] = "",
    service: Annotated[str, Form()] = "",
    task_id: Annotated[str, Form()] = "",
) -> Response:
    """Deliver again every delivery matching the form (`POST /v1/deliveries/replay`)."""
    problems: list[str] = []
    start = _utc_time(since, "since", problems)
    end = _utc_time(until, "until", problems)
    if start is None and not problems:
        problems.append("since: is required: the oldest delivery to replay, e.g. an hour ago")
    if status and status not in DELIVERY_STATUSES:
        problems.append(f"status: must be one of {', '.join(STATUS_ORDER)} (got {status[:40]!r})")
    if event and event not in EVENTS:
        problems.append(f"event: must be one of {', '.join(sorted(EVENTS))} (got {event[:40]!r})")
    if service and not re.fullmatch(SERVICE_PATTERN.strip("^$"), service):
        problems.append(f"service: must be 1-32 of a-z, 0-9 and - (got {service[:40]!r})")
    if task_id and not re.fullmatch(TASK_ID_PATTERN.strip("^$"), task_id):
        problems.append(f"task id: 1-128 of A-Z a-z 0-9 . _ : - (got {task_id[:140]!r})")
    with signed_in(request) as (session, client, token):
        require_csrf(token, csrf_token)
        ops = operations(request)
        if ops is None:
            return back_to("/ui/deliveries", error="not_available")
        if start is not None and not problems:
            try:
                count = ops.replay_deliveries(
                    session,
                    client_id=client.id,
                    since=start,
                    until=end,
                    status=status or None,
                    event=event or None,
                    service=service or None,
                    task_id=task_id or None,
                    now=utcnow(),
                )
            except (InvalidQuery, Conflict) as exc:
                problems.append(exc.message)
            else:
                return back_to("/ui/deliveries", notice="replayed", count=count)
        values = context(
            request,
            client,
            token,
            title="Replay deliveries",
            nav="deliveries",
            problems=problems,
            form={
                "since": since,
                "until": until,
                "status": status,
                "event": event,
                "service": service,
                "task_id": task_id,
            },
            statuses=STATUS_ORDER,
            events=sorted(EVENTS),
        )
    return page("replay.html", values, status_code=422)


@router.get("/destinations")
def destinations_page(request: Request) -> Response:
    """The client's callback destinations with their state, and resume buttons."""
    with signed_in(request) as (session, client, token):
        ops = operations(request)
        destinations = ops.list_destinations(session, client_id=client.id) if ops else []
        values = context(
            request,
            client,
            token,
            title="Destinations",
            nav="destinations",
            destinations=destinations,
            available=ops is not None,
        )
    return page("destinations.html", values)


@router.post("/destinations/{destination_id}/resume")
def resume(
    request: Request, destination_id: str, csrf_token: Annotated[str, Form()] = ""
) -> Response:
    """Close an open or disabled destination now (`POST /v1/destinations/{id}/resume`)."""
    with signed_in(request) as (session, client, token):
        require_csrf(token, csrf_token)
        ops = operations(request)
        if ops is None:
            return back_to("/ui/destinations", error="not_available")
        try:
            ops.resume_destination(session, destination_id[:64], client_id=client.id, now=utcnow())
        except NotFound:
            return not_found(
                request, client, token, f"No destination {destination_id[:64]!r} for {client.name}."
            )
        except Conflict as exc:
            return back_to("/ui/destinations", error=exc.code)
    return back_to("/ui/destinations", notice="resumed")
