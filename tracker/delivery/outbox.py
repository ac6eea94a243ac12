"""The webhook outbox: which deliveries are due, leasing them for an attempt, resending.

Every webhook to send is a `webhook_deliveries` row written in the same
transaction as the state change it reports (`tracker.tracking.transitions`). A delivery is
due when it is pending and its `next_attempt_at` has passed; an attempt first
leases it (`claimed_until`), so two workers never send it at once and a worker
that dies gives it back when the lease ends. Events of one task go out in
order: a delivery waits while an older one of its task is pending or in flight.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, any_, exists, literal, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from tracker.db.engine import is_postgresql
from tracker.db.models import WebhookDelivery
from tracker.errors import Conflict, DeliveryNotFound
from tracker.states import DELIVERY_PENDING, DELIVERY_SUPERSEDED

# Deliveries per `deliver` job: one claim, one record, their requests sent at once.
DELIVERY_BATCH = 50


# Built once: a fresh alias per call costs more than the claim's SQL itself.
_OLDER_DELIVERY = aliased(WebhookDelivery, name="older_delivery")


def among(
    column: InstrumentedAttribute[Any], values: Collection[Any], session: Session
) -> ColumnElement[bool]:
    """`column IN values`; on PostgreSQL one array parameter, not one per value, so a
    batch's statement is compiled and converted once, whatever its size."""
    if is_postgresql(session):
        return column == any_(literal(list(values), ARRAY(column.type)))
    return column.in_(values)


def among_ids(ids: Collection[str], session: Session) -> ColumnElement[bool]:
    return among(WebhookDelivery.id, ids, session)


def _lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until <= now)


def older_event_unsettled(now: datetime) -> ColumnElement[bool]:
    """An older delivery of the same task is still pending or in flight: this one must wait."""
    older = _OLDER_DELIVERY
    return exists().where(
        older.task_row_id == WebhookDelivery.task_row_id,
        older.created_at < WebhookDelivery.created_at,
        or_(older.status == DELIVERY_PENDING, older.claimed_until > now),
    )


def delivery_batches(delivery_ids: Iterable[str]) -> list[list[str]]:
    """`delivery_ids` without repeats, in batches of at most `DELIVERY_BATCH`, in order."""
    unique = list(dict.fromkeys(delivery_ids))
    return [unique[i : i + DELIVERY_BATCH] for i in range(0, len(unique), DELIVERY_BATCH)]


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


@dataclass(frozen=True)
class Claim:
    """A delivery leased for one attempt, with what sending it needs."""

    id: str
    client_id: int
    callback_url: str
    payload: str
    lease: datetime  # the claim's `claimed_until`: proves the row is still ours afterwards


def claim_deliveries(
    session: Session, delivery_ids: Collection[str], *, now: datetime, lease_seconds: float
) -> list[Claim]:
    """Lease those of `delivery_ids` that are pending, due and free; the others are left alone.

    A delivery also waits while an older delivery of the same task is pending or
    in flight, so a receiver never gets an older event after a newer one (two
    events of one task in the same batch: only the older is claimed). On
    PostgreSQL the rows are locked with SKIP LOCKED; on SQLite the transaction
    already holds the single write lock (BEGIN IMMEDIATE). Two statements
    whatever the batch size: one select, one update.
    """
    if not delivery_ids:
        return []
    query = (
        select(
            WebhookDelivery.id,
            WebhookDelivery.client_id,
            WebhookDelivery.callback_url,
            WebhookDelivery.payload,
        )
        .where(
            among_ids(delivery_ids, session),
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDelivery.next_attempt_at <= now,
            _lease_free(now),
            ~older_event_unsettled(now),
        )
        .order_by(WebhookDelivery.id)
    )
    if is_postgresql(session):
        query = query.with_for_update(skip_locked=True, of=WebhookDelivery)
    rows = session.execute(query).all()
    if not rows:
        return []
    lease = now + timedelta(seconds=lease_seconds)
    session.execute(
        update(WebhookDelivery)
        .where(among_ids([row.id for row in rows], session))
        .values(claimed_until=lease)
        .execution_options(synchronize_session=False)
    )
    return [Claim(row.id, row.client_id, row.callback_url, row.payload, lease) for row in rows]


def claim_delivery(
    session: Session, delivery_id: str, *, now: datetime, lease_seconds: float
) -> Claim | None:
    """Lease one due delivery (`claim_deliveries` of one id); None if it is not claimable."""
    claims = claim_deliveries(session, [delivery_id], now=now, lease_seconds=lease_seconds)
    return claims[0] if claims else None


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
        owner = " for this client" if client_id is not None else ""
        raise DeliveryNotFound(
            f"no delivery {delivery_id!r}{owner}; "
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
