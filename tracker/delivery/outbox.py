"""The webhook outbox: which deliveries are due, in what order, and resending.

Every webhook to send is a `webhook_deliveries` row written in the same
transaction as the state change it reports (`tracker.tracking.transitions`). A delivery is
due when it is pending and its `next_attempt_at` has passed and no attempt holds its
lease (`claimed_until`; leasing is `tracker.delivery.claims`). Events of one task go
out in order: a delivery waits while an older one of its task is pending or in flight.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ColumnElement,
    and_,
    any_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from tracker.db.engine import is_postgresql
from tracker.db.models import WebhookDelivery, WebhookDestination
from tracker.errors import Conflict, DeliveryNotFound
from tracker.states import (
    DELIVERY_PENDING,
    DELIVERY_SUPERSEDED,
    DESTINATION_HEALTHY,
    DESTINATION_OPEN,
)

if TYPE_CHECKING:
    from tracker.delivery.rows import DeliveryRow

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


def lease_free(now: datetime) -> ColumnElement[bool]:
    """No attempt holds the delivery's lease at `now`."""
    return or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until <= now)


def older_event_unsettled(now: datetime) -> ColumnElement[bool]:
    """An older delivery of the same task is still pending or in flight: this one must wait."""
    older = _OLDER_DELIVERY
    return exists().where(
        older.task_row_id == WebhookDelivery.task_row_id,
        older.created_at < WebhookDelivery.created_at,
        or_(older.status == DELIVERY_PENDING, older.claimed_until > now),
    )


def newer_event_pending() -> ColumnElement[bool]:
    """A newer delivery of the same task is pending: it may be waiting for this one."""
    newer = _NEWER_DELIVERY
    return exists().where(
        newer.task_row_id == WebhookDelivery.task_row_id,
        newer.created_at > WebhookDelivery.created_at,
        newer.status == DELIVERY_PENDING,
    )


_NEWER_DELIVERY = aliased(WebhookDelivery, name="newer_delivery")


def waiting_newer_events(
    session: Session, settled: Sequence[DeliveryRow], now: datetime
) -> dict[str, tuple[str, ...]]:
    """Per settled delivery, the due deliveries of its task created after it: the order
    rule held them back. One query for the batch (a still pending one keeps them waiting)."""
    if not settled:
        return {}
    newer_by_task: dict[int, list[tuple[datetime, str]]] = {}
    for row in session.execute(
        select(WebhookDelivery.task_row_id, WebhookDelivery.created_at, WebhookDelivery.id)
        .where(
            among(
                WebhookDelivery.task_row_id,
                {delivery.task_row_id for delivery in settled},
                session,
            ),
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.created_at)
    ):
        newer_by_task.setdefault(row.task_row_id, []).append((row.created_at, row.id))
    return {
        delivery.id: tuple(
            delivery_id
            for created_at, delivery_id in newer_by_task.get(delivery.task_row_id or 0, ())
            if created_at > delivery.created_at
        )
        for delivery in settled
    }


def delivery_batches(delivery_ids: Iterable[str]) -> list[list[str]]:
    """`delivery_ids` without repeats, in batches of at most `DELIVERY_BATCH`, in order."""
    unique = list(dict.fromkeys(delivery_ids))
    return [unique[i : i + DELIVERY_BATCH] for i in range(0, len(unique), DELIVERY_BATCH)]


def due_delivery_ids(
    session: Session,
    *,
    now: datetime,
    limit: int,
    per_destination: int = DELIVERY_BATCH,
    probes_at: datetime | None = None,
) -> list[str]:
    """Ids of pending deliveries due at `now` and not leased, taken fairly across
    destinations (the sweep).

    Round robin: each destination's oldest due first, then each one's second, and so
    on, at most `per_destination` of one destination, so a destination with 10,000 due
    does not crowd out the others. An open destination gives only its probe, once the
    probe is due; a disabled one gives none (the sweep fails its deliveries).
    `probes_at`: when probes count as due, if not `now` (the sweep looks for deliveries
    whose doorbell was lost some time ago, but a probe has no doorbell: it is due on time).
    """
    probes_at = probes_at or now
    destination = WebhookDestination
    ranked = (
        select(
            WebhookDelivery.id,
            WebhookDelivery.next_attempt_at,
            destination.state,
            func.row_number()
            .over(
                partition_by=(WebhookDelivery.client_id, WebhookDelivery.destination),
                order_by=(WebhookDelivery.next_attempt_at, WebhookDelivery.id),
            )
            .label("rank"),
        )
        .outerjoin(destination, destination_of_delivery())
        .where(
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDelivery.next_attempt_at <= probes_at,
            lease_free(probes_at),
            or_(
                destination.state == DESTINATION_OPEN,
                WebhookDelivery.next_attempt_at <= now,
            ),
            or_(
                destination.state.is_(None),
                destination.state == DESTINATION_HEALTHY,
                and_(destination.state == DESTINATION_OPEN, destination.next_probe_at <= probes_at),
            ),
        )
        .subquery()
    )
    query = (
        select(ranked.c.id)
        .where(
            ranked.c.rank <= case((ranked.c.state == DESTINATION_OPEN, 1), else_=per_destination)
        )
        .order_by(ranked.c.rank, ranked.c.next_attempt_at)
        .limit(limit)
    )
    return list(session.scalars(query))


def destination_of_delivery() -> ColumnElement[bool]:
    """Join condition: the `webhook_destinations` row of a delivery's destination."""
    return and_(
        WebhookDestination.client_id == WebhookDelivery.client_id,
        WebhookDestination.origin == WebhookDelivery.destination,
    )


def next_due_ids(
    session: Session,
    destinations: Collection[tuple[int, str]],
    *,
    now: datetime,
    limit: int = DELIVERY_BATCH,
) -> list[str]:
    """Ids of the next due, unleased deliveries of these destinations, oldest due first."""
    ids: list[str] = []
    for client_id, origin in sorted(destinations):
        ids += session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.client_id == client_id,
                WebhookDelivery.destination == origin,
                WebhookDelivery.status == DELIVERY_PENDING,
                WebhookDelivery.next_attempt_at <= now,
                lease_free(now),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        )
    return ids


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
