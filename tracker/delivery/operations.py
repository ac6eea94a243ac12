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
from tracker.db.models import Client, WebhookDelivery
from tracker.delivery.destinations import DestinationChange
from tracker.states import (
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
