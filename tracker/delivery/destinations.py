"""Webhook destinations: a client's callback (scheme, host, port) and its circuit breaker.

Each destination is a `webhook_destinations` row, shared by every worker and kept
across restarts. A claim locks the destinations of its batch (`lock_destinations`)
and counts their leased deliveries, so at most TRACKER_DESTINATION_CONCURRENCY
attempts to one destination are in flight across all workers. Answers are tallied
per destination (`record_destination_answers`):

    healthy --(TRACKER_DESTINATION_FAILURES consecutive failed attempts)--> open
    open    --(a 2xx, to a probe sent every TRACKER_DESTINATION_PROBE s)--> healthy
    open    --(no success for TRACKER_DESTINATION_DISABLE_AFTER s: the sweep)--> disabled
    open | disabled --(resume, or a replay of its deliveries)--> healthy

While open, its due deliveries wait with their attempt counts untouched; once
disabled, they end `failed` (`destination_disabled`) until a resume or replay.
Lock order, everywhere: deliveries, then destinations (the sweep's disabling takes
only deliveries no attempt holds).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, literal, select, text, tuple_, update
from sqlalchemy.orm import Session

from tracker.clock import isoformat_z
from tracker.config import Settings
from tracker.db.engine import dialect_insert, is_postgresql
from tracker.db.models import WebhookDelivery, WebhookDestination
from tracker.errors import DestinationNotFound
from tracker.states import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DESTINATION_DISABLED,
    DESTINATION_DISABLED_STATE,
    DESTINATION_HEALTHY,
    DESTINATION_OPEN,
    DESTINATION_OPENED,
    DESTINATION_RECOVERED,
)

DestinationKey = tuple[int, str]  # (client id, `scheme://host:port`)

# A healthy destination's `last_success_at` is rewritten at most this often: a busy
# destination's answers would otherwise all queue for its row's lock.
LAST_SUCCESS_RESOLUTION = timedelta(seconds=1)
DISABLED_FAILURE = "destination_disabled"

# PostgreSQL: the batch's destinations locked (transaction advisory locks), so that claims
# of one destination count its leases one at a time, then created if new. A claim never
# waits for another: a destination whose lock another claim holds is left to it
# (`pg_try_advisory_xact_lock`), and only the holder of the lock inserts its row.
_LOCK_FOR_IDS_PG = text(
    """
    WITH locked AS MATERIALIZED (
        SELECT client_id, destination FROM (
            SELECT DISTINCT client_id, destination FROM webhook_deliveries
            WHERE id = ANY(CAST(:ids AS varchar[])) AND status = 'pending'
        ) AS wanted
        WHERE pg_try_advisory_xact_lock(client_id, hashtext(destination))
    ), created AS (
        INSERT INTO webhook_destinations
            (client_id, origin, state, consecutive_failures, created_at, updated_at)
        SELECT client_id, destination, 'healthy', 0, :now, :now FROM locked
        ON CONFLICT (client_id, origin) DO NOTHING
    )
    SELECT client_id, destination FROM locked
    """
)
_LOCK_FOR_KEYS_PG = text(
    """
    SELECT client_id, destination
    FROM unnest(CAST(:client_ids AS integer[]), CAST(:origins AS varchar[]))
        AS wanted(client_id, destination)
    WHERE pg_try_advisory_xact_lock(client_id, hashtext(destination))
    """
)


def lock_destinations(
    session: Session,
    *,
    now: datetime,
    delivery_ids: Collection[str] = (),
    destinations: Collection[DestinationKey] = (),
) -> set[DestinationKey] | None:
    """Create the destinations of these pending deliveries if new, and lock them (or
    `destinations`) until the transaction ends; the destinations locked. One whose lock
    another claim holds is not waited for and not returned. SQLite: the transaction
    holds the database's one write lock already; the rows are only created (None: all
    locked)."""
    if is_postgresql(session):
        rows: list[Any] = []
        if delivery_ids:
            rows += session.execute(_LOCK_FOR_IDS_PG, {"ids": list(delivery_ids), "now": now})
        if destinations:
            keys = sorted(destinations)
            rows += session.execute(
                _LOCK_FOR_KEYS_PG,
                {"client_ids": [k[0] for k in keys], "origins": [k[1] for k in keys]},
            )
        return {(row[0], row[1]) for row in rows}
    if delivery_ids:
        wanted = (
            select(
                WebhookDelivery.client_id,
                WebhookDelivery.destination,
                literal(DESTINATION_HEALTHY),
                literal(0),
                literal(now, WebhookDestination.created_at.type),
                literal(now, WebhookDestination.updated_at.type),
            )
            .where(WebhookDelivery.id.in_(delivery_ids), WebhookDelivery.status == DELIVERY_PENDING)
            .distinct()
        )
        session.execute(
            dialect_insert(session)(WebhookDestination)
            .from_select(
                [
                    "client_id",
                    "origin",
                    "state",
                    "consecutive_failures",
                    "created_at",
                    "updated_at",
                ],
                wanted,
            )
            .on_conflict_do_nothing(index_elements=["client_id", "origin"])
        )
    return None


@dataclass
class Tally:
    """One destination's answers in a batch."""

    successes: int = 0
    failures: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class DestinationChange:
    """A destination that changed state: the operational event to send about it."""

    event: str  # destination.opened, destination.disabled or destination.recovered
    destination_id: int
    client_id: int
    origin: str
    consecutive_failures: int
    last_error: str | None


def record_destination_answers(
    session: Session, tallies: dict[int, Tally], *, settings: Settings, now: datetime
) -> list[DestinationChange]:
    """Count a batch's answers against their destinations (by id): a success closes the
    circuit and resets the count; failures add up and open it at
    TRACKER_DESTINATION_FAILURES. Returns the destinations that opened or recovered."""
    if not tallies:
        return []
    query = (
        select(WebhookDestination)
        .where(WebhookDestination.id.in_(tallies))
        .order_by(WebhookDestination.id)
        .execution_options(populate_existing=True)
    )
    if is_postgresql(session):
        query = query.with_for_update()
    changes = []
    for destination in session.scalars(query):
        tally = tallies[destination.id]
        was = destination.state
        if tally.successes:
            destination.state = DESTINATION_HEALTHY
            destination.consecutive_failures = 0
            destination.failing_since = None
            destination.last_success_at = now
            destination.opened_at = destination.next_probe_at = destination.disabled_at = None
            if was != DESTINATION_HEALTHY:
                changes.append(_change(DESTINATION_RECOVERED, destination))
        elif tally.failures:
            destination.consecutive_failures += tally.failures
            destination.failing_since = destination.failing_since or now
            destination.last_error = tally.last_error
            if (
                was == DESTINATION_HEALTHY
                and destination.consecutive_failures >= settings.destination_failures
            ):
                destination.state = DESTINATION_OPEN
                destination.opened_at = now
                destination.next_probe_at = now + timedelta(seconds=settings.destination_probe)
                changes.append(_change(DESTINATION_OPENED, destination))
        destination.updated_at = now
    session.flush()
    return changes


def _change(event: str, destination: WebhookDestination) -> DestinationChange:
    return DestinationChange(
        event,
        destination.id,
        destination.client_id,
        destination.origin,
        destination.consecutive_failures,
        destination.last_error,
    )


def disable_failing_destinations(
    session: Session, *, settings: Settings, now: datetime
) -> list[DestinationChange]:
    """The sweep: open destinations without a success for TRACKER_DESTINATION_DISABLE_AFTER
    become disabled, and the deliveries of every disabled destination end `failed`
    (`destination_disabled`), but those an attempt holds (their answer settles them)."""
    cutoff = now - timedelta(seconds=settings.destination_disable_after)
    disabled = session.execute(
        update(WebhookDestination)
        .where(
            WebhookDestination.state == DESTINATION_OPEN,
            WebhookDestination.failing_since <= cutoff,
        )
        .values(
            state=DESTINATION_DISABLED_STATE,
            disabled_at=now,
            next_probe_at=None,
            updated_at=now,
        )
        .returning(
            WebhookDestination.id,
            WebhookDestination.client_id,
            WebhookDestination.origin,
            WebhookDestination.consecutive_failures,
            WebhookDestination.last_error,
        )
        .execution_options(synchronize_session=False)
    ).all()
    keys = session.execute(
        select(WebhookDestination.client_id, WebhookDestination.origin).where(
            WebhookDestination.state == DESTINATION_DISABLED_STATE
        )
    ).all()
    if keys:
        fail_held_deliveries(session, [(key[0], key[1]) for key in keys], now=now)
    return [DestinationChange(DESTINATION_DISABLED, *row) for row in disabled]


def fail_held_deliveries(session: Session, keys: list[DestinationKey], *, now: datetime) -> int:
    """End the pending, unleased deliveries of these (disabled) destinations `failed`."""
    result = session.execute(
        update(WebhookDelivery)
        .where(
            tuple_(WebhookDelivery.client_id, WebhookDelivery.destination).in_(keys),
            WebhookDelivery.status == DELIVERY_PENDING,
            (WebhookDelivery.claimed_until.is_(None)) | (WebhookDelivery.claimed_until <= now),
        )
        .values(
            status=DELIVERY_FAILED,
            next_attempt_at=None,
            claimed_until=None,
            failure_code=DISABLED_FAILURE,
            failure_message=(
                "its destination is disabled: it failed without a success for "
                "TRACKER_DESTINATION_DISABLE_AFTER; fix the receiver, then resume the "
                "destination (`POST /v1/destinations/{id}/resume`) or replay its deliveries"
            ),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def resume_destination(
    session: Session, destination_id: int, *, client_id: int | None, now: datetime
) -> WebhookDestination:
    """Close a destination's circuit now: `healthy`, its failure count reset; what it held
    is due at once, and what it failed as `destination_disabled` is pending again."""
    query = select(WebhookDestination).where(WebhookDestination.id == destination_id)
    if client_id is not None:
        query = query.where(WebhookDestination.client_id == client_id)
    destination = session.scalar(query.execution_options(populate_existing=True))
    if destination is None:
        raise DestinationNotFound(
            f"no destination {destination_id!r} for this client; `GET /v1/destinations` "
            "or `tracker destinations list` shows them"
        )
    release_destinations(session, [(destination.client_id, destination.origin)], now=now)
    session.refresh(destination)
    return destination


def release_destinations(session: Session, keys: Iterable[DestinationKey], *, now: datetime) -> int:
    """Destinations back to `healthy`, their `destination_disabled` deliveries pending and
    due now (deliveries first, then destinations: the lock order). Returns how many
    deliveries were made pending again."""
    keys = sorted(set(keys))
    if not keys:
        return 0
    released = session.execute(
        update(WebhookDelivery)
        .where(
            tuple_(WebhookDelivery.client_id, WebhookDelivery.destination).in_(keys),
            WebhookDelivery.status == DELIVERY_FAILED,
            WebhookDelivery.failure_code == DISABLED_FAILURE,
        )
        .values(
            status=DELIVERY_PENDING,
            next_attempt_at=now,
            failure_code=None,
            failure_message=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(WebhookDestination)
        .where(tuple_(WebhookDestination.client_id, WebhookDestination.origin).in_(keys))
        .values(
            state=DESTINATION_HEALTHY,
            consecutive_failures=0,
            failing_since=None,
            opened_at=None,
            next_probe_at=None,
            disabled_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(released, "rowcount", 0) or 0)


def list_destinations(session: Session, *, client_id: int | None) -> list[dict[str, Any]]:
    """Destinations (the client's, or every client's) with their pending deliveries."""
    pending = (
        select(func.count())
        .where(
            WebhookDelivery.client_id == WebhookDestination.client_id,
            WebhookDelivery.destination == WebhookDestination.origin,
            WebhookDelivery.status == DELIVERY_PENDING,
        )
        .scalar_subquery()
    )
    query = select(WebhookDestination, pending.label("pending")).order_by(WebhookDestination.id)
    if client_id is not None:
        query = query.where(WebhookDestination.client_id == client_id)
    return [destination_resource(d, held) for d, held in session.execute(query)]


def destination_resource(destination: WebhookDestination, held: int) -> dict[str, Any]:
    """A destination as the API shows it (docs/api.md)."""
    scheme, _, rest = destination.origin.partition("://")
    host, _, port = rest.rpartition(":")
    return {
        "id": destination.id,
        "url": destination.origin,
        "scheme": scheme,
        "host": host.strip("[]"),
        "port": int(port) if port.isdigit() else None,
        "state": destination.state,
        "consecutive_failures": destination.consecutive_failures,
        "last_success_at": isoformat_z(destination.last_success_at),
        "failing_since": isoformat_z(destination.failing_since),
        "last_error": destination.last_error,
        "opened_at": isoformat_z(destination.opened_at),
        "next_probe_at": isoformat_z(destination.next_probe_at),
        "disabled_at": isoformat_z(destination.disabled_at),
        "held_deliveries": held,
    }


def insert_destination(session: Session, client_id: int, origin: str, *, now: datetime) -> None:
    """Create a destination row if it is new (tests, replays to a destination never tried)."""
    session.execute(
        dialect_insert(session)(WebhookDestination)
        .values(
            client_id=client_id,
            origin=origin,
            state=DESTINATION_HEALTHY,
            consecutive_failures=0,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["client_id", "origin"])
    )
