"""Operational events: telling a client that its webhooks are in trouble.

`delivery.failing` (a delivery failed its 4th attempt), `delivery.exhausted` (it failed
for good), `destination.opened`, `destination.disabled` and `destination.recovered` go
to the client's `operations_url`, if set, as outbox rows of their own: signed, retried
and logged like any webhook, but tied to no task. They are never about themselves: an
operational event that fails causes no `delivery.*` event, and the destination of the
operations URL gets no `destination.*` event about it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tracker.clock import isoformat_z
from tracker.db.models import Client, Task, WebhookDelivery
from tracker.delivery.destinations import DestinationChange
from tracker.delivery.rows import DeliveryRow
from tracker.delivery.sender import WebhookAnswer
from tracker.states import (
    DELIVERY_EXHAUSTED,
    DELIVERY_FAILED,
    DELIVERY_FAILING,
    DELIVERY_PENDING,
    DESTINATION_DISABLED,
    DESTINATION_DISABLED_STATE,
    DESTINATION_HEALTHY,
    DESTINATION_OPEN,
    DESTINATION_OPENED,
    DESTINATION_RECOVERED,
    OPERATIONAL_EVENTS,
)
from tracker.tracking.schemas import destination_of
from tracker.tracking.transitions import new_delivery_id

# The attempt whose failure makes a delivery `failing`.
FAILING_AFTER_ATTEMPTS = 4


@dataclass(frozen=True)
class OperationalEvent:
    """One event to send to a client's operations URL."""

    client_id: int
    event: str
    data: dict[str, Any]
    # The destination it is about (`scheme://host:port`), if any: none is sent about the
    # operations URL's own destination.
    about_destination: str | None = None


def is_operational(event: str) -> bool:
    return event in OPERATIONAL_EVENTS


def operational_payload(event: str, data: dict[str, Any], *, now: datetime) -> str:
    """The body of an operational event: `type`, `timestamp`, `data` (docs/webhooks.md)."""
    body = {"type": event, "timestamp": isoformat_z(now), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def queue_operational_events(
    session: Session, events: Sequence[OperationalEvent], *, now: datetime
) -> list[str]:
    """Outbox rows for `events` whose client has an operations URL; their ids, due now."""
    if not events:
        return []
    targets = dict(
        session.execute(
            select(Client.id, Client.operations_url).where(
                Client.id.in_({event.client_id for event in events}),
                Client.operations_url.is_not(None),
            )
        ).all()
    )
    ids = []
    for event in events:
        url = targets.get(event.client_id)
        if url is None:
            continue
        destination = destination_of(url)
        if event.about_destination == destination:
            continue  # never about itself
        delivery = WebhookDelivery(
            id=new_delivery_id(),
            client_id=event.client_id,
            task_row_id=None,
            event=event.event,
            callback_url=url,
            destination=destination,
            payload=operational_payload(event.event, event.data, now=now),
            status=DELIVERY_PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
        session.add(delivery)
        ids.append(delivery.id)
    session.flush()
    return ids


def destination_event(change: DestinationChange) -> OperationalEvent:
    """The operational event of a destination's change of state."""
    state = {
        DESTINATION_OPENED: DESTINATION_OPEN,
        DESTINATION_DISABLED: DESTINATION_DISABLED_STATE,
        DESTINATION_RECOVERED: DESTINATION_HEALTHY,
    }[change.event]
    data = {
        "destination": {
            "id": change.destination_id,
            "url": change.origin,
            "state": state,
            "consecutive_failures": change.consecutive_failures,
        },
        "last_error": change.last_error,
    }
    return OperationalEvent(change.client_id, change.event, data, change.origin)


def delivery_events(
    session: Session, troubled: list[tuple[DeliveryRow, WebhookAnswer]], now: datetime
) -> list[OperationalEvent]:
    """`delivery.failing` for a task event that failed its 4th attempt, `delivery.exhausted`
    for one that failed for good (never for an operational event itself)."""
    events: list[tuple[str, DeliveryRow, WebhookAnswer]] = []
    for delivery, answer in troubled:
        if delivery.task_row_id is None:
            continue
        if delivery.attempts == FAILING_AFTER_ATTEMPTS:
            events.append((DELIVERY_FAILING, delivery, answer))
        if delivery.status == DELIVERY_FAILED:
            events.append((DELIVERY_EXHAUSTED, delivery, answer))
    if not events:
        return []
    tasks = {
        row.id: row
        for row in session.execute(
            select(Task.id, Task.task_id, Task.service).where(
                Task.id.in_({delivery.task_row_id for _, delivery, _ in events})
            )
        )
    }
    result = []
    for event, delivery, answer in events:
        task = tasks.get(delivery.task_row_id or 0)
        data = {
            "delivery": {
                "id": delivery.id,
                "event": delivery.event,
                "task_id": task.task_id if task else None,
                "service": task.service if task else None,
                "status": delivery.status,
                "attempts": delivery.attempts,
                "next_attempt_at": isoformat_z(delivery.next_attempt_at),
                "destination": delivery.destination,
                "failure": None
                if delivery.failure_code is None
                else {"code": delivery.failure_code, "message": delivery.failure_message or ""},
            },
            "last_status_code": answer.status_code,
            "last_error": answer.error,
        }
        result.append(OperationalEvent(delivery.client_id, event, data, delivery.destination))
    return result
