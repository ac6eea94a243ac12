"""Webhook delivery: claim a batch of outbox rows, send one attempt each, schedule the next.

One call of `attempt_deliveries` (a `deliver` job) is three steps, so no
database transaction is open while a receiver is slow:

1. a short transaction claims the due rows of the batch with a lease, in one
   statement, and reads their payloads, URLs and the clients' secrets in force;
2. outside any transaction, the process's sending threads each resolve and vet
   a callback host (`tracker.netguard`) and POST the stored payload to the
   vetted address, all requests of the batch at once;
3. short transactions log the attempts and apply the outcome rules to the rows
   still ours; a row that changed meanwhile (superseded, retried by hand, lease
   taken over) only gets its attempt logged.

The retry schedule lives on the row (`next_attempt_at`), never in broker
countdowns. Nothing here knows about Celery.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import requests
from sqlalchemy import (
    ColumnElement,
    Engine,
    any_,
    exists,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased, sessionmaker

from tracker import metrics
from tracker.clients import secrets_in_force
from tracker.config import Settings
from tracker.db import is_postgresql, retry_while_unreachable
from tracker.errors import Conflict, DeliveryNotFound
from tracker.models import WebhookAttempt, WebhookDelivery
from tracker.netguard import Resolver
from tracker.sender import WebhookAnswer, send_pool, send_webhook
from tracker.states import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SUCCEEDED,
    DELIVERY_SUPERSEDED,
)
from tracker.timeutil import utcnow

log = logging.getLogger("tracker.delivery")

# Scheduled delays vary by +-20 %, so receivers that failed together are not retried together.
RETRY_JITTER = 0.2
MANUAL_RETRY_HINT = "`tracker deliveries retry {id}` or `POST /v1/deliveries/{id}/retry`"
# Deliveries per `deliver` job: one claim, one record, their requests sent at once.
DELIVERY_BATCH = 50


# Built once: a fresh alias per call costs more than the claim's SQL itself.
_OLDER_DELIVERY = aliased(WebhookDelivery, name="older_delivery")


def _among(
    column: InstrumentedAttribute[Any], values: Collection[Any], session: Session
) -> ColumnElement[bool]:
    """`column IN values`; on PostgreSQL one array parameter, not one per value, so a
    batch's statement is compiled and converted once, whatever its size."""
    if is_postgresql(session):
        return column == any_(literal(list(values), ARRAY(column.type)))
    return column.in_(values)


def _among_ids(ids: Collection[str], session: Session) -> ColumnElement[bool]:
    return _among(WebhookDelivery.id, ids, session)


def _lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until <= now)


def _older_event_unsettled(now: datetime) -> ColumnElement[bool]:
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
            _among_ids(delivery_ids, session),
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDelivery.next_attempt_at <= now,
            _lease_free(now),
            ~_older_event_unsettled(now),
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
        .where(_among_ids([row.id for row in rows], session))
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


def next_retry_delay(
    schedule: Sequence[float],
    attempts_made: int,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds before the next attempt once `attempts_made` failed; None: the schedule is done.

    `schedule[k]` is the delay before attempt k+1, jittered by +-20 %. A
    receiver's `Retry-After` is honoured, clamped between the scheduled delay
    and twice it, so no receiver can push a delivery out for days.
    """
    if attempts_made >= len(schedule):
        return None
    nominal = schedule[attempts_made]
    delay = nominal * (rng or random).uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
    if retry_after is not None:
        delay = min(max(delay, retry_after), 2 * nominal)
    return delay


@dataclass(frozen=True)
class DeliveryOutcome:
    """What became of one delivery of an `attempt_deliveries` batch.

    `attempted` is False when nothing was sent and `skipped` says why:
    `not_found`, `not_pending`, `not_due`, `claimed` (another worker has it)
    or `waiting_for_older` (an older event of the task is pending or in flight).
    """

    delivery_id: str
    attempted: bool
    status: str | None = None  # the delivery's status afterwards
    attempt: int | None = None
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    skipped: str | None = None
    # Newer deliveries of the same task that waited for this attempt and are due: enqueue them.
    follow_up_ids: tuple[str, ...] = ()


Sessions = Engine | sessionmaker[Session]


@contextmanager
def _transaction(sessions: Sessions) -> Iterator[Session]:
    if isinstance(sessions, Engine):
        with Session(sessions, expire_on_commit=False) as session, session.begin():
            yield session
    else:
        with sessions.begin() as session:
            yield session


def attempt_delivery(
    sessions: Sessions,
    delivery_id: str,
    *,
    settings: Settings,
    http: requests.Session | None = None,
    resolver: Resolver | None = None,
    now_fn: Callable[[], datetime] = utcnow,
) -> DeliveryOutcome:
    """One attempt of one due delivery: `attempt_deliveries` of a single id."""
    (outcome,) = attempt_deliveries(
        sessions, [delivery_id], settings=settings, http=http, resolver=resolver, now_fn=now_fn
    )
    return outcome


def attempt_deliveries(
    sessions: Sessions,
    delivery_ids: Iterable[str],
    *,
    settings: Settings,
    http: requests.Session | None = None,
    resolver: Resolver | None = None,
    now_fn: Callable[[], datetime] = utcnow,
) -> list[DeliveryOutcome]:
    """One attempt of each due delivery of a batch; an outcome per id, in order.

    A short transaction claims the batch and reads the payloads and the
    clients' secrets; the requests then go out at once from the process's
    sending threads (`tracker.sender.send_pool`), outside any transaction; the
    answers are recorded as they come in (those in together in one transaction),
    so neither a slow receiver nor a dying worker holds back the record of the
    others. Safe to call twice for the same ids at once (a duplicated job): the
    lease lets one call send, the other returns `attempted=False`.
    """
    ids = list(dict.fromkeys(delivery_ids))
    with _transaction(sessions) as session:
        now = now_fn()
        claims = claim_deliveries(session, ids, now=now, lease_seconds=settings.webhook_lease)
        lease_ends = time.monotonic() + settings.webhook_lease
        claimed = {claim.id for claim in claims}
        outcomes = {
            outcome.delivery_id: outcome
            for outcome in _not_claimed(session, [i for i in ids if i not in claimed], now)
        }
        secrets = secrets_in_force(session, {claim.client_id for claim in claims}, now=now)

    pool = send_pool()
    sending = {
        pool.submit(
            send_webhook,
            claim.callback_url,
            claim.id,
            claim.payload,
            secrets.get(claim.client_id, ()),
            timeout=settings.webhook_timeout,
            allow_private=settings.webhook_allow_private,
            http=http,
            resolver=resolver,
            now_fn=now_fn,
        ): claim
        for claim in claims
    }
    unsent: BaseException | None = None
    waiting: set[Future[WebhookAnswer]] = set(sending)
    while waiting:
        # Every answer in so far, recorded at once: an answer acknowledged but not yet
        # recorded is sent again if the worker dies, so none waits for the others.
        done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
        answered = []
        for future in done:
            error = future.exception()
            if error is None:
                answered.append((sending[future], future.result()))
            else:  # a bug, not a receiver's answer: its lease expires and it is tried again
                unsent = unsent or error
        if answered:
            # The receivers have answered: if the database is away (restarting), wait for
            # it while the leases hold rather than lose the answers, each of which would
            # be sent again once its lease expires (a duplicate for the receiver).
            recorded = retry_while_unreachable(
                partial(_record_answers, sessions, answered, settings, now_fn),
                deadline=lease_ends,
                what="recording webhook answers",
            )
            outcomes.update((outcome.delivery_id, outcome) for outcome in recorded)
    if unsent is not None:
        raise unsent
    return [outcomes[delivery_id] for delivery_id in ids]


def _record_answers(
    sessions: Sessions,
    answered: Sequence[tuple[Claim, WebhookAnswer]],
    settings: Settings,
    now_fn: Callable[[], datetime],
) -> list[DeliveryOutcome]:
    with _transaction(sessions) as session:
        return _record_attempts(session, answered, settings=settings, now=now_fn())


def _not_claimed(session: Session, delivery_ids: list[str], now: datetime) -> list[DeliveryOutcome]:
    """Explain why deliveries could not be claimed, for logs and the caller."""
    if not delivery_ids:
        return []
    rows = {
        row.id: row
        for row in session.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.status,
                WebhookDelivery.next_attempt_at,
                _older_event_unsettled(now).label("waiting"),
            ).where(_among_ids(delivery_ids, session))
        )
    }
    outcomes = []
    for delivery_id in delivery_ids:
        row = rows.get(delivery_id)
        if row is None:
            outcomes.append(DeliveryOutcome(delivery_id, attempted=False, skipped="not_found"))
            continue
        if row.status != DELIVERY_PENDING:
            reason = "not_pending"
        elif row.next_attempt_at is None or row.next_attempt_at > now:
            reason = "not_due"
        elif row.waiting:
            reason = "waiting_for_older"
        else:  # leased, or locked by a claim not yet committed (PostgreSQL's SKIP LOCKED)
            reason = "claimed"
        outcomes.append(
            DeliveryOutcome(
                delivery_id,
                attempted=False,
                status=row.status,
                next_attempt_at=row.next_attempt_at,
                skipped=reason,
            )
        )
    return outcomes


@dataclass
class _Row:
    """The columns of a delivery that recording an attempt reads and writes."""

    id: str
    task_row_id: int
    created_at: datetime
    status: str
    attempts: int
    next_attempt_at: datetime | None
    claimed_until: datetime | None
    updated_at: datetime
    delivered_at: datetime | None
    last_status_code: int | None
    failure_code: str | None
    failure_message: str | None


_ROW_COLUMNS = tuple(getattr(WebhookDelivery, name) for name in _Row.__dataclass_fields__)
_WRITTEN = tuple(
    name for name in _Row.__dataclass_fields__ if name not in ("task_row_id", "created_at")
)
_SHARED = tuple(name for name in _WRITTEN if name not in ("id", "attempts"))


def _record_attempts(
    session: Session,
    answered: Sequence[tuple[Claim, WebhookAnswer]],
    *,
    settings: Settings,
    now: datetime,
) -> list[DeliveryOutcome]:
    """Log the attempts; apply the outcome rules to the rows still ours, then free them.

    A row superseded, retried by hand or taken over meanwhile (its lease is not
    the claim's any more) only gets the attempt logged. One select, one insert
    and one executemany update for the whole batch.
    """
    query = (
        select(*_ROW_COLUMNS)
        .where(_among_ids([claim.id for claim, _ in answered], session))
        .order_by(WebhookDelivery.id)  # rows locked in one order: no deadlock between batches
    )
    if is_postgresql(session):
        query = query.with_for_update()
    rows = {row.id: _Row(*row) for row in session.execute(query)}
    attempt_rows: list[dict[str, Any]] = []
    settled: list[_Row] = []
    recorded: list[tuple[_Row, WebhookAnswer]] = []
    outcomes: list[DeliveryOutcome] = []
    for claim, answer in answered:
        delivery = rows.get(claim.id)
        if delivery is None:  # the task (and its outbox) was deleted meanwhile
            outcomes.append(DeliveryOutcome(claim.id, attempted=True, error=answer.error))
            continue
        delivery.attempts += 1
        attempt_rows.append(
            {
                "delivery_id": delivery.id,
                "attempt": delivery.attempts,
                "started_at": answer.started_at,
                "duration_ms": answer.duration_ms,
                "status_code": answer.status_code,
                "response_excerpt": answer.excerpt,
                "error": answer.error,
            }
        )
        if delivery.claimed_until == claim.lease:
            delivery.claimed_until = None
            if delivery.status == DELIVERY_PENDING:
                _apply_outcome(delivery, answer, settings=settings, now=now)
            if delivery.status != DELIVERY_PENDING:
                settled.append(delivery)
        # Otherwise it was superseded, retried by hand or taken over meanwhile: only logged.
        delivery.updated_at = now
        recorded.append((delivery, answer))
    if recorded:
        _insert_attempts(session, attempt_rows)
        _write_rows(session, [delivery for delivery, _ in recorded])
    follow_ups = _waiting_newer_events(session, settled, now)
    for delivery, answer in recorded:
        log.info(
            "webhook attempt",
            extra={
                "delivery_id": delivery.id,
                "attempt": delivery.attempts,
                "status_code": answer.status_code,
                "delivery_status": delivery.status,
                "duration_ms": answer.duration_ms,
                "error": answer.error,
            },
        )
        _count_attempt(delivery, answer, now)
        outcomes.append(
            DeliveryOutcome(
                delivery.id,
                attempted=True,
                status=delivery.status,
                attempt=delivery.attempts,
                status_code=answer.status_code,
                error=answer.error,
                next_attempt_at=delivery.next_attempt_at,
                follow_up_ids=follow_ups.get(delivery.id, ()),
            )
        )
    return outcomes


def _count_attempt(delivery: _Row, answer: WebhookAnswer, now: datetime) -> None:
    metrics.DELIVERY_LATENCY.observe(answer.duration_ms / 1000)
    outcome = "retry" if delivery.status == DELIVERY_PENDING else delivery.status
    metrics.DELIVERIES.labels(outcome=outcome).inc()
    if delivery.status == DELIVERY_SUCCEEDED:
        # created_at is when the transition was observed: this is the client's wait.
        metrics.COMPLETION_TO_DELIVERY.observe((now - delivery.created_at).total_seconds())


_ATTEMPT_COLUMNS = (
    "delivery_id",
    "attempt",
    "started_at",
    "duration_ms",
    "status_code",
    "response_excerpt",
    "error",
)
# PostgreSQL: the batch's attempts as one array per column, so the statement is the same
# (compiled and converted once) whatever the batch size.
_INSERT_ATTEMPTS_PG = text(
    f"INSERT INTO {WebhookAttempt.__tablename__} ({', '.join(_ATTEMPT_COLUMNS)}) "
    "SELECT * FROM unnest(CAST(:delivery_id AS varchar[]), CAST(:attempt AS integer[]), "
    "CAST(:started_at AS timestamptz[]), CAST(:duration_ms AS integer[]), "
    "CAST(:status_code AS integer[]), CAST(:response_excerpt AS text[]), "
    "CAST(:error AS text[]))"
)


def _insert_attempts(session: Session, attempt_rows: list[dict[str, Any]]) -> None:
    if is_postgresql(session):
        session.execute(
            _INSERT_ATTEMPTS_PG,
            {name: [row[name] for row in attempt_rows] for name in _ATTEMPT_COLUMNS},
        )
    else:
        session.execute(insert(WebhookAttempt), attempt_rows)


def _write_rows(session: Session, deliveries: Sequence[_Row]) -> None:
    """Write the rows back: one UPDATE per set of equal values (a batch that succeeded is
    one statement), the rest (retries, each with its own jittered time) in one executemany."""
    groups: dict[tuple[object, ...], list[_Row]] = {}
    for delivery in deliveries:
        groups.setdefault(tuple(getattr(delivery, name) for name in _SHARED), []).append(delivery)
    singles = []
    for values, group in groups.items():
        if len(group) == 1:
            singles.append({name: getattr(group[0], name) for name in _WRITTEN})
            continue
        # Each row's attempts were read under the lock and raised by one: the same as +1.
        session.execute(
            update(WebhookDelivery)
            .where(_among_ids([delivery.id for delivery in group], session))
            .values(
                {
                    **dict(zip(_SHARED, values, strict=True)),
                    "attempts": WebhookDelivery.attempts + 1,
                }
            )
            .execution_options(synchronize_session=False)
        )
    if singles:
        session.execute(update(WebhookDelivery), singles)


def _waiting_newer_events(
    session: Session, settled: Sequence[_Row], now: datetime
) -> dict[str, tuple[str, ...]]:
    """Per settled delivery, the due deliveries of its task created after it: the order
    rule held them back. One query for the batch (a still pending one keeps them waiting)."""
    if not settled:
        return {}
    newer_by_task: dict[int, list[tuple[datetime, str]]] = {}
    for row in session.execute(
        select(WebhookDelivery.task_row_id, WebhookDelivery.created_at, WebhookDelivery.id)
        .where(
            _among(
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
            for created_at, delivery_id in newer_by_task.get(delivery.task_row_id, ())
            if created_at > delivery.created_at
        )
        for delivery in settled
    }


def _apply_outcome(
    delivery: _Row, answer: WebhookAnswer, *, settings: Settings, now: datetime
) -> None:
    """The outcome rules of SPEC section 4 for a pending delivery that was just attempted."""
    delivery.last_status_code = answer.status_code
    if answer.succeeded:
        delivery.status = DELIVERY_SUCCEEDED
        delivery.delivered_at = now
        delivery.next_attempt_at = None
        delivery.failure_code = delivery.failure_message = None
        return
    hint = MANUAL_RETRY_HINT.format(id=delivery.id)
    if answer.refused is not None:
        _fail(delivery, answer.refused.code, f"{answer.refused.message}; then retry: {hint}")
        return
    if answer.status_code == 410:
        _fail(
            delivery,
            "gone",
            "the receiver answered 410 Gone: it does not want this webhook, so it is not "
            f"retried; if that was a mistake, fix the receiver and retry: {hint}",
        )
        return
    delay = next_retry_delay(
        settings.webhook_retry_schedule, delivery.attempts, retry_after=answer.retry_after
    )
    if delay is None:
        _fail(
            delivery,
            "retries_exhausted",
            f"gave up after {delivery.attempts} attempts (TRACKER_WEBHOOK_RETRY_SCHEDULE); "
            f"last error: {answer.error}. Fix the receiver, then retry: {hint}",
        )
        return
    delivery.next_attempt_at = now + timedelta(seconds=delay)


def _fail(delivery: _Row, code: str, message: str) -> None:
    delivery.status = DELIVERY_FAILED
    delivery.next_attempt_at = None
    delivery.failure_code = code
    delivery.failure_message = message
