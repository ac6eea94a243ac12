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

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import requests
from sqlalchemy import ColumnElement, Engine, exists, or_, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from tracker import metrics
from tracker.clients import active_secrets
from tracker.config import Settings
from tracker.db import is_postgresql
from tracker.errors import Conflict, DeliveryNotFound
from tracker.models import Client, WebhookAttempt, WebhookDelivery
from tracker.netguard import Resolver
from tracker.sender import WebhookAnswer, send_webhook
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


# Built once: a fresh alias per call costs more than the claim's SQL itself.
_OLDER_DELIVERY = aliased(WebhookDelivery, name="older_delivery")


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
    """What one call of `attempt_delivery` did.

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


@dataclass(frozen=True)
class _Claimed:
    """What an attempt needs from the database, read in the claiming transaction."""

    id: str
    callback_url: str
    payload: str
    secrets: tuple[str, ...]
    lease: datetime  # the claim's `claimed_until`: proves the row is still ours afterwards


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
    """One attempt of a due delivery: claim, send outside any transaction, record the outcome.

    Safe to call twice for the same id at once (a duplicated job): the lease lets
    one call send, the other returns `attempted=False`.
    """
    with _transaction(sessions) as session:
        now = now_fn()
        delivery = claim_delivery(
            session, delivery_id, now=now, lease_seconds=settings.webhook_lease
        )
        if delivery is None:
            return _not_claimed(session, delivery_id, now)
        client = session.get(Client, delivery.client_id)
        secrets = active_secrets(client, now=now) if client is not None else []
        lease = delivery.claimed_until
        assert lease is not None  # claim_delivery has just set it
        claimed = _Claimed(
            delivery.id, delivery.callback_url, delivery.payload, tuple(secrets), lease
        )

    answer = send_webhook(
        claimed.callback_url,
        claimed.id,
        claimed.payload,
        claimed.secrets,
        timeout=settings.webhook_timeout,
        allow_private=settings.webhook_allow_private,
        http=http,
        resolver=resolver,
        now_fn=now_fn,
    )

    with _transaction(sessions) as session:
        return _record_attempt(session, claimed, answer, settings=settings, now=now_fn())


def _not_claimed(session: Session, delivery_id: str, now: datetime) -> DeliveryOutcome:
    """Explain why a delivery could not be claimed, for logs and the caller."""
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None:
        return DeliveryOutcome(delivery_id, attempted=False, skipped="not_found")
    if delivery.status != DELIVERY_PENDING:
        reason = "not_pending"
    elif delivery.next_attempt_at is None or delivery.next_attempt_at > now:
        reason = "not_due"
    elif session.scalar(
        select(WebhookDelivery.id).where(
            WebhookDelivery.id == delivery_id, _older_event_unsettled(now)
        )
    ):
        reason = "waiting_for_older"
    else:  # leased, or locked by a claim not yet committed (PostgreSQL's SKIP LOCKED)
        reason = "claimed"
    return DeliveryOutcome(
        delivery_id,
        attempted=False,
        status=delivery.status,
        next_attempt_at=delivery.next_attempt_at,
        skipped=reason,
    )


def _record_attempt(
    session: Session, claimed: _Claimed, answer: WebhookAnswer, *, settings: Settings, now: datetime
) -> DeliveryOutcome:
    """Log the attempt; apply the outcome rules if the row is still ours, then free it."""
    query = select(WebhookDelivery).where(WebhookDelivery.id == claimed.id)
    if is_postgresql(session):
        query = query.with_for_update()
    delivery = session.scalar(query.execution_options(populate_existing=True))
    if delivery is None:  # the task (and its outbox) was deleted meanwhile
        return DeliveryOutcome(claimed.id, attempted=True, error=answer.error)
    delivery.attempts += 1
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            attempt=delivery.attempts,
            started_at=answer.started_at,
            duration_ms=answer.duration_ms,
            status_code=answer.status_code,
            response_excerpt=answer.excerpt,
            error=answer.error,
        )
    )
    follow_up_ids: tuple[str, ...] = ()
    if delivery.claimed_until == claimed.lease:
        delivery.claimed_until = None
        if delivery.status == DELIVERY_PENDING:
            _apply_outcome(delivery, answer, settings=settings, now=now)
        follow_up_ids = _waiting_newer_events(session, delivery, now)
    # Otherwise it was superseded, retried by hand or taken over meanwhile: only logged.
    delivery.updated_at = now
    session.flush()
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
    return DeliveryOutcome(
        delivery.id,
        attempted=True,
        status=delivery.status,
        attempt=delivery.attempts,
        status_code=answer.status_code,
        error=answer.error,
        next_attempt_at=delivery.next_attempt_at,
        follow_up_ids=follow_up_ids,
    )


def _count_attempt(delivery: WebhookDelivery, answer: WebhookAnswer, now: datetime) -> None:
    metrics.DELIVERY_LATENCY.observe(answer.duration_ms / 1000)
    outcome = "retry" if delivery.status == DELIVERY_PENDING else delivery.status
    metrics.DELIVERIES.labels(outcome=outcome).inc()
    if delivery.status == DELIVERY_SUCCEEDED:
        # created_at is when the transition was observed: this is the client's wait.
        metrics.COMPLETION_TO_DELIVERY.observe((now - delivery.created_at).total_seconds())


def _waiting_newer_events(
    session: Session, delivery: WebhookDelivery, now: datetime
) -> tuple[str, ...]:
    """Due deliveries of the same task created after `delivery`: the order rule held them back."""
    if delivery.status == DELIVERY_PENDING:
        return ()  # still unsettled: they keep waiting
    return tuple(
        session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.task_row_id == delivery.task_row_id,
                WebhookDelivery.created_at > delivery.created_at,
                WebhookDelivery.status == DELIVERY_PENDING,
                WebhookDelivery.next_attempt_at <= now,
            )
            .order_by(WebhookDelivery.created_at)
        )
    )


def _apply_outcome(
    delivery: WebhookDelivery, answer: WebhookAnswer, *, settings: Settings, now: datetime
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


def _fail(delivery: WebhookDelivery, code: str, message: str) -> None:
    delivery.status = DELIVERY_FAILED
    delivery.next_attempt_at = None
    delivery.failure_code = code
    delivery.failure_message = message
