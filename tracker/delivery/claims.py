"""Claims: leasing due deliveries for an attempt, within what their destinations allow.

An attempt first leases its deliveries (`claimed_until`), so two workers never send
one at once and a worker that dies gives it back when the lease ends. A claim also
asks each delivery's destination (`tracker.delivery.destinations`): at most
TRACKER_DESTINATION_CONCURRENCY of its attempts in flight, only a probe while it is
open, none while it is disabled. On PostgreSQL, the slots that answered attempts free
are handed over to their destinations' next due deliveries (`hand_over_slots`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Connection, and_, func, select, text, update
from sqlalchemy.orm import Session, aliased

from tracker.db.engine import is_postgresql
from tracker.db.models import WebhookDelivery, WebhookDestination
from tracker.delivery.destinations import lock_destinations
from tracker.delivery.outbox import (
    among_ids,
    destination_of_delivery,
    lease_free,
    older_event_unsettled,
)
from tracker.states import DELIVERY_PENDING, DESTINATION_HEALTHY, DESTINATION_OPEN

# TRACKER_DESTINATION_CONCURRENCY and TRACKER_DESTINATION_PROBE at their defaults.
DEFAULT_DESTINATION_CONCURRENCY = 8
DEFAULT_DESTINATION_PROBE = 60.0


@dataclass(frozen=True)
class Claim:
    """A delivery leased for one attempt, with what sending it needs."""

    id: str
    client_id: int
    callback_url: str
    payload: str
    lease: datetime  # the claim's `claimed_until`: proves the row is still ours afterwards
    destination_id: int = 0
    destination: str = ""  # `scheme://host:port`
    # Sent while its destination is open: its answer decides whether the circuit closes.
    probe: bool = False

    @property
    def destination_key(self) -> tuple[int, str]:
        return (self.client_id, self.destination)


@dataclass
class Claimed:
    """What one claim took, and what it left and why."""

    claims: list[Claim] = field(default_factory=list)
    # Ids left because of their destination: `destination_busy`, `destination_open`
    # or `destination_disabled`.
    held: dict[str, str] = field(default_factory=dict)
    # Destinations another claim was counting (its lock taken) with no attempt in flight:
    # look again shortly. One with attempts in flight is not among them, nor one found
    # full: the jobs holding its slots take its next due deliveries as their answers
    # free them (`attempt_deliveries`).
    contended: set[tuple[int, str]] = field(default_factory=set)


def claim_deliveries(
    session: Session,
    delivery_ids: Collection[str],
    *,
    now: datetime,
    lease_seconds: float,
    concurrency: int = DEFAULT_DESTINATION_CONCURRENCY,
    probe_seconds: float = DEFAULT_DESTINATION_PROBE,
) -> list[Claim]:
    """Lease those of `delivery_ids` that are pending, due, free and let through by their
    destination; the others are left alone (`claim_batch` says why)."""
    return claim_batch(
        session,
        delivery_ids,
        now=now,
        lease_seconds=lease_seconds,
        concurrency=concurrency,
        probe_seconds=probe_seconds,
    ).claims


def claim_batch(
    session: Session,
    delivery_ids: Collection[str],
    *,
    now: datetime,
    lease_seconds: float,
    concurrency: int = DEFAULT_DESTINATION_CONCURRENCY,
    probe_seconds: float = DEFAULT_DESTINATION_PROBE,
) -> Claimed:
    """Lease those of `delivery_ids` that are pending, due and free, within what their
    destinations allow.

    A delivery waits while an older delivery of the same task is pending or in
    flight, so a receiver never gets an older event after a newer one. A destination
    takes at most `concurrency` attempts in flight across all workers (its leased
    rows, counted under a lock of the destination: `lock_destinations`); an open one
    only its probe, once due; a disabled one none. On PostgreSQL the rows are locked
    with SKIP LOCKED; on SQLite the transaction already holds the single write lock
    (BEGIN IMMEDIATE). A destination another claim is counting is left to it (its rows
    held as `destination_busy`), so claims never wait for each other. Three statements
    whatever the batch size: the destinations locked, the candidates read, the leases
    written (and one more when a probe goes).
    """
    if not delivery_ids:
        return Claimed()
    locked = lock_destinations(session, delivery_ids=delivery_ids, now=now)
    return _claim(
        session,
        among_ids(delivery_ids, session),
        locked,
        now=now,
        lease_seconds=lease_seconds,
        concurrency=concurrency,
        probe_seconds=probe_seconds,
    )


def claim_next_due(
    session: Session,
    destinations: Collection[tuple[int, str]],
    *,
    now: datetime,
    lease_seconds: float,
    concurrency: int = DEFAULT_DESTINATION_CONCURRENCY,
    probe_seconds: float = DEFAULT_DESTINATION_PROBE,
) -> Claimed:
    """Lease the next due deliveries of these destinations, oldest due first, within what
    each allows: a deliver job whose answers freed a destination's slots takes its next
    deliveries at once, without a round through the broker."""
    claimed = Claimed()
    if not destinations:
        return claimed
    locked = lock_destinations(session, destinations=destinations, now=now)
    for client_id, origin in sorted(destinations):
        if locked is not None and (client_id, origin) not in locked:
            claimed.contended.add((client_id, origin))  # another claim has it: look again
            continue
        one = _claim(
            session,
            and_(WebhookDelivery.client_id == client_id, WebhookDelivery.destination == origin),
            locked,
            now=now,
            lease_seconds=lease_seconds,
            concurrency=concurrency,
            probe_seconds=probe_seconds,
            limit=concurrency,
        )
        claimed.claims += one.claims
        claimed.held.update(one.held)
    return claimed


_LEASED = aliased(WebhookDelivery, name="leased_delivery")


def _claim(
    session: Session,
    which: ColumnElement[bool],
    locked: set[tuple[int, str]] | None,
    *,
    now: datetime,
    lease_seconds: float,
    concurrency: int,
    probe_seconds: float,
    limit: int | None = None,
) -> Claimed:
    leased = _LEASED
    in_flight = (
        select(func.count())
        .where(
            leased.client_id == WebhookDelivery.client_id,
            leased.destination == WebhookDelivery.destination,
            leased.claimed_until > now,
        )
        .scalar_subquery()
    )
    destination = WebhookDestination
    query = (
        select(
            WebhookDelivery.id,
            WebhookDelivery.client_id,
            WebhookDelivery.callback_url,
            WebhookDelivery.payload,
            WebhookDelivery.destination,
            destination.id.label("destination_id"),
            destination.state,
            destination.next_probe_at,
            in_flight.label("in_flight"),
        )
        .join(destination, destination_of_delivery())
        .where(
            which,
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDelivery.next_attempt_at <= now,
            lease_free(now),
            ~older_event_unsettled(now),
        )
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
    )
    if limit is not None:
        query = query.limit(limit)
    if is_postgresql(session):
        query = query.with_for_update(skip_locked=True, of=WebhookDelivery)
    rows = session.execute(query).all()
    claimed = Claimed()
    if not rows:
        return claimed
    lease = now + timedelta(seconds=lease_seconds)
    taken: dict[tuple[int, str], int] = {}
    probes: set[int] = set()
    for row in rows:
        key = (row.client_id, row.destination)
        count = taken.get(key, 0)
        if locked is not None and key not in locked:  # another claim is counting its leases
            room, reason = 0, "destination_busy"
        elif row.state == DESTINATION_HEALTHY:
            room = concurrency - row.in_flight
            reason = "destination_busy"
        elif row.state == DESTINATION_OPEN:
            probe_due = row.next_probe_at is None or row.next_probe_at <= now
            room = 1 if probe_due and row.in_flight == 0 else 0
            reason = "destination_open"
        else:
            room, reason = 0, "destination_disabled"
        if count >= room:
            claimed.held[row.id] = reason
            if locked is not None and key not in locked and row.in_flight == 0:
                # Its counting claim may take none of these: look again once it is done.
                # With attempts in flight, their jobs take its next due as they answer.
                claimed.contended.add(key)
            continue
        taken[key] = count + 1
        probe = row.state == DESTINATION_OPEN
        if probe:
            probes.add(row.destination_id)
        claimed.claims.append(
            Claim(
                row.id,
                row.client_id,
                row.callback_url,
                row.payload,
                lease,
                destination_id=row.destination_id,
                destination=row.destination,
                probe=probe,
            )
        )
    if claimed.claims:
        session.execute(
            update(WebhookDelivery)
            .where(among_ids([claim.id for claim in claimed.claims], session))
            .values(claimed_until=lease)
            .execution_options(synchronize_session=False)
        )
    if probes:
        # The next probe waits its interval, even if this one's worker dies.
        session.execute(
            update(WebhookDestination)
            .where(WebhookDestination.id.in_(probes))
            .values(next_probe_at=now + timedelta(seconds=probe_seconds), updated_at=now)
            .execution_options(synchronize_session=False)
        )
    return claimed


# PostgreSQL: each destination's next due deliveries leased in the slots its answered
# attempts free, oldest due first, skipping rows another claim has locked and those whose
# older event is unsettled; only while the destination is healthy.
_HAND_OVER_PG = text(
    """
    WITH freed AS (
        SELECT * FROM unnest(CAST(:destination_ids AS bigint[]), CAST(:slots AS integer[]))
            AS f(destination_id, slots)
    ), next AS (
        SELECT nxt.id, w.id AS destination_id
        FROM freed
        JOIN webhook_destinations AS w ON w.id = freed.destination_id AND w.state = :healthy
        CROSS JOIN LATERAL (
            SELECT d.id FROM webhook_deliveries AS d
            WHERE d.client_id = w.client_id AND d.destination = w.origin
              AND d.status = :pending AND d.next_attempt_at <= :now
              AND (d.claimed_until IS NULL OR d.claimed_until <= :now)
              AND NOT EXISTS (
                  SELECT 1 FROM webhook_deliveries AS older
                  WHERE older.task_row_id = d.task_row_id AND older.created_at < d.created_at
                    AND (older.status = :pending OR older.claimed_until > :now)
              )
            ORDER BY d.next_attempt_at, d.id
            LIMIT freed.slots
            FOR UPDATE OF d SKIP LOCKED
        ) AS nxt
    )
    UPDATE webhook_deliveries AS d SET claimed_until = :lease
    FROM next WHERE d.id = next.id
    RETURNING d.id, d.client_id, d.callback_url, d.payload, d.destination, next.destination_id
    """
)


def hand_over_slots(
    connection: Connection,
    freed: dict[int, int],
    *,
    now: datetime,
    lease_seconds: float,
) -> list[Claim]:
    """PostgreSQL: lease each destination's next due deliveries in the slots its answered
    attempts free (`freed`: destination id -> slots), in one autocommitted statement.

    Run before those answers are recorded: until then their leases still count, so a
    slot is never seen free by another claim and taken twice; the destination's attempts
    in flight stay within TRACKER_DESTINATION_CONCURRENCY without counting or locking
    them, and its next attempt goes without a claim of its own
    (docs/decisions/0016-destination-isolation.md).
    """
    if not freed:
        return []
    ids = sorted(freed)
    lease = now + timedelta(seconds=lease_seconds)
    rows = connection.execute(
        _HAND_OVER_PG,
        {
            "destination_ids": ids,
            "slots": [freed[i] for i in ids],
            "healthy": DESTINATION_HEALTHY,
            "pending": DELIVERY_PENDING,
            "now": now,
            "lease": lease,
        },
    )
    return [
        Claim(
            row.id,
            row.client_id,
            row.callback_url,
            row.payload,
            lease,
            destination_id=row.destination_id,
            destination=row.destination,
        )
        for row in rows
    ]


def claim_delivery(
    session: Session, delivery_id: str, *, now: datetime, lease_seconds: float
) -> Claim | None:
    """Lease one due delivery (`claim_deliveries` of one id); None if it is not claimable."""
    claims = claim_deliveries(session, [delivery_id], now=now, lease_seconds=lease_seconds)
    return claims[0] if claims else None
