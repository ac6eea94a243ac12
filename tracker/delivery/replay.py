"""Bulk replay: deliver again every delivery of a client that matches a filter.

Bounded (at most `MAX_REPLAY` matches, else the caller narrows the range) and
idempotent per delivery: a delivery replayed is pending and due now with the same id
(`webhook-id`); replayed again before it is sent, it is still one pending delivery. A
superseded delivery is never sent, and neither is an older event of a task whose newer
event is not replayed with it (the receiver would get an older event after a newer one).
Replaying re-opens the disabled destinations of what it replays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tracker.db.models import Task, WebhookDelivery, WebhookDestination
from tracker.delivery.destinations import release_destinations
from tracker.delivery.outbox import among_ids
from tracker.errors import InvalidQuery
from tracker.states import DELIVERY_PENDING, DELIVERY_SUPERSEDED, DESTINATION_DISABLED_STATE

MAX_REPLAY = 10_000


@dataclass(frozen=True)
class ReplayFilter:
    """Which deliveries to replay: created in [since, until], and the optional filters."""

    since: datetime
    until: datetime | None = None
    status: str | None = None
    event: str | None = None
    service: str | None = None
    task_id: str | None = None


def replay_deliveries(
    session: Session, wanted: ReplayFilter, *, client_id: int, now: datetime
) -> int:
    """Make every matching delivery of `client_id` pending and due now; how many will go."""
    if wanted.until is not None and wanted.until < wanted.since:
        raise InvalidQuery(
            f"until: must not be before since (got since={wanted.since.isoformat()!r}, "
            f"until={wanted.until.isoformat()!r})"
        )
    query = (
        select(
            WebhookDelivery.id,
            WebhookDelivery.task_row_id,
            WebhookDelivery.created_at,
            WebhookDelivery.destination,
            WebhookDelivery.claimed_until,
        )
        .outerjoin(Task, Task.id == WebhookDelivery.task_row_id)
        .where(
            WebhookDelivery.client_id == client_id,
            WebhookDelivery.created_at >= wanted.since,
            WebhookDelivery.status != DELIVERY_SUPERSEDED,
        )
    )
    if wanted.until is not None:
        query = query.where(WebhookDelivery.created_at <= wanted.until)
    if wanted.status is not None:
        query = query.where(WebhookDelivery.status == wanted.status)
    if wanted.event is not None:
        query = query.where(WebhookDelivery.event == wanted.event)
    if wanted.service is not None:
        query = query.where(Task.service == wanted.service)
    if wanted.task_id is not None:
        query = query.where(Task.task_id == wanted.task_id)
    matched = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    if matched > MAX_REPLAY:
        field = "since" if wanted.until is None else "until"
        raise InvalidQuery(
            f"{field}: {matched} deliveries match, more than the {MAX_REPLAY} one replay "
            "may take; narrow the range with since/until (or add status, event, service, "
            "task_id) and replay it in parts"
        )
    rows = session.execute(query).all()
    if not rows:
        return 0
    ids = {row.id for row in rows}
    outdated = _outdated(session, rows, ids)
    replayed = [row for row in rows if row.id not in outdated]
    # One in flight is left to its attempt: it is pending already, and stays one delivery.
    to_reset = [row.id for row in replayed if row.claimed_until is None or row.claimed_until <= now]
    for start in range(0, len(to_reset), 1000):
        session.execute(
            update(WebhookDelivery)
            .where(among_ids(to_reset[start : start + 1000], session))
            .values(
                status=DELIVERY_PENDING,
                next_attempt_at=now,
                claimed_until=None,
                failure_code=None,
                failure_message=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    destinations = {row.destination for row in replayed}
    disabled = session.execute(
        select(WebhookDestination.client_id, WebhookDestination.origin).where(
            WebhookDestination.client_id == client_id,
            WebhookDestination.origin.in_(destinations),
            WebhookDestination.state == DESTINATION_DISABLED_STATE,
        )
    ).all()
    release_destinations(session, [(row[0], row[1]) for row in disabled], now=now)
    return len(replayed)


def _outdated(session: Session, rows: Sequence[Any], ids: set[str]) -> set[str]:
    """Matches with a newer delivery of their task that is not superseded and not replayed."""
    task_ids = {row.task_row_id for row in rows if row.task_row_id is not None}
    if not task_ids:
        return set()
    newest: dict[int, datetime] = {}
    for task_row_id, created_at in session.execute(
        select(WebhookDelivery.task_row_id, WebhookDelivery.created_at).where(
            WebhookDelivery.task_row_id.in_(task_ids),
            WebhookDelivery.status != DELIVERY_SUPERSEDED,
            WebhookDelivery.id.not_in(ids),
        )
    ):
        if task_row_id is not None and (
            task_row_id not in newest or created_at > newest[task_row_id]
        ):
            newest[task_row_id] = created_at
    return {
        row.id
        for row in rows
        if row.task_row_id is not None
        and row.task_row_id in newest
        and newest[row.task_row_id] > row.created_at
    }
