"""Webhook delivery: claim an outbox row, guard and send one attempt, schedule the next.

One attempt (`attempt_delivery`) is three steps, so no database transaction is
open while a receiver is slow:

1. a short transaction claims the row with a lease and reads the payload, the
   URL and the client's secrets in force;
2. outside any transaction, the callback host is resolved and vetted
   (`tracker.netguard`) and the stored payload is POSTed to the vetted address;
3. a short transaction logs the attempt and applies the outcome rules, unless
   the row changed meanwhile (superseded, retried by hand, lease taken over),
   in which case the attempt is only logged.

The retry schedule lives on the row (`next_attempt_at`), never in broker
countdowns. Nothing here knows about Celery.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, exists, or_, select
from sqlalchemy.orm import Session, aliased

from tracker.db import is_postgresql
from tracker.errors import Conflict, DeliveryNotFound
from tracker.models import WebhookDelivery
from tracker.states import DELIVERY_PENDING, DELIVERY_SUPERSEDED


def _lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until <= now)


def _older_event_unsettled(now: datetime) -> ColumnElement[bool]:
    """An older delivery of the same task is still pending or in flight: this one must wait."""
    older = aliased(WebhookDelivery)
    return exists().where(
        older.task_row_id == WebhookDelivery.task_row_id,
        older.created_at < WebhookDelivery.created_at,
        or_(older.status == DELIVERY_PENDING, older.claimed_until > now),
    )


def due_delivery_ids(session: Session, *, now: datetime, limit: int) -> list[str]:
    """Ids of pending deliveries due at `now` and not leased, oldest due first (the sweep)."""
    query = (
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDelivery.next_attempt_at <= now,
            _lease_free(now),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def claim_delivery(
    session: Session, delivery_id: str, *, now: datetime, lease_seconds: float
) -> WebhookDelivery | None:
    """Lease one due delivery for an attempt; None if it is not pending, not due or taken.

    A delivery also waits while an older delivery of the same task is pending or
    in flight, so a receiver never gets an older event after a newer one.
    On PostgreSQL the row is locked with SKIP LOCKED; on SQLite the transaction
    already holds the single write lock (BEGIN IMMEDIATE).
    """
    query = (
        select(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDelivery.next_attempt_at <= now,
            _lease_free(now),
            ~_older_event_unsettled(now),
        )
        .execution_options(populate_existing=True)
    )
    if is_postgresql(session):
        query = query.with_for_update(skip_locked=True, of=WebhookDelivery)
    delivery = session.scalar(query)
    if delivery is None:
        return None
    delivery.claimed_until = now + timedelta(seconds=lease_seconds)
    session.flush()
    return delivery


def redeliver(
    session: Session, delivery_id: str, *, client_id: int | None = None, now: datetime
) -> WebhookDelivery:
    """Make a delivery due again now, with the same id (`webhook-id`); attempts keep counting.

    Works on pending, failed and succeeded deliveries. A superseded one, or one
    of an older event than another delivery of its task, is refused
    (`Conflict`): sending it would give the receiver an older event after a
    newer one. The retry schedule resumes where the attempts left it, so a
    delivery that had exhausted the schedule gets exactly one more attempt.
    """
    query = select(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
    if client_id is not None:
        query = query.where(WebhookDelivery.client_id == client_id)
    if is_postgresql(session):
        query = query.with_for_update()
    delivery = session.scalar(query.execution_options(populate_existing=True))
    if delivery is None:
        raise DeliveryNotFound(
            f"no delivery {delivery_id!r} for this client; "
            "`GET /v1/deliveries` or `tracker deliveries list` shows them"
        )
    if delivery.status == DELIVERY_SUPERSEDED:
        raise Conflict(
            f"delivery {delivery_id!r} ({delivery.event}) was superseded by a newer event of "
            "its task and is not sent any more; retry the newer delivery instead",
            code="delivery_superseded",
        )
    newer = session.scalar(
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.task_row_id == delivery.task_row_id,
            WebhookDelivery.created_at > delivery.created_at,
            WebhookDelivery.status != DELIVERY_SUPERSEDED,
        )
        .limit(1)
    )
    if newer is not None:
        raise Conflict(
            f"delivery {delivery_id!r} ({delivery.event}) is older than delivery {newer!r} of "
            "the same task; resending it would give the receiver an older event after a newer "
            f"one. Retry {newer!r} instead",
            code="delivery_outdated",
        )
    delivery.status = DELIVERY_PENDING
    delivery.next_attempt_at = now
    # An attempt in flight finds its lease gone and only logs what it saw.
    delivery.claimed_until = None
    delivery.failure_code = None
    delivery.failure_message = None
    delivery.updated_at = now
    session.flush()
    return delivery
