"""Recording webhook attempts: the attempt log and the outcome rules of docs/webhooks.md.

A receiver's answer becomes a `webhook_attempts` row, and for a delivery still
leased by the attempt, its new status: succeeded on 2xx; failed on 410, on a
refused callback address or when the retry schedule is done; otherwise pending
again at the next time of `TRACKER_WEBHOOK_RETRY_SCHEDULE` (jittered, honouring
`Retry-After` within bounds: `tracker.delivery.retries`).

The general path (`record_attempts`) and its single-statement PostgreSQL twin for 2xx
answers (`settle_acknowledged`) must apply the same rule, and are kept side by side so
that a change to one is seen in the other. The rows they read and write, and the
attempt log, are `tracker.delivery.rows`; the operational events an attempt causes,
`tracker.delivery.operations`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, text
from sqlalchemy.orm import Session

from tracker.config import Settings
from tracker.db.engine import is_postgresql
from tracker.db.models import WebhookDelivery
from tracker.delivery.claims import Claim
from tracker.delivery.destinations import (
    LAST_SUCCESS_RESOLUTION,
    Tally,
    record_destination_answers,
)
from tracker.delivery.operations import (
    delivery_events,
    destination_event,
    queue_operational_events,
)
from tracker.delivery.outbox import (
    among_ids,
    newer_event_pending,
    next_due_ids,
    waiting_newer_events,
)
from tracker.delivery.retries import MANUAL_RETRY_HINT, next_retry_delay
from tracker.delivery.rows import (
    ATTEMPT_COLUMNS,
    ROW_COLUMNS,
    DeliveryRow,
    insert_attempts,
    write_rows,
)
from tracker.delivery.sender import WebhookAnswer
from tracker.observability import metrics
from tracker.states import (
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SUCCEEDED,
    DESTINATION_HEALTHY,
    DESTINATION_RECOVERED,
)

# The attempt log lines keep the logger name operators filter on.
log = logging.getLogger("tracker.delivery")


@dataclass(frozen=True)
class DeliveryOutcome:
    """What became of one delivery of an `attempt_deliveries` batch.

    `attempted` is False when nothing was sent and `skipped` says why:
    `not_found`, `not_pending`, `not_due`, `claimed` (another worker has it),
    `waiting_for_older` (an older event of the task is pending or in flight),
    `destination_busy` (its destination has as many attempts in flight as it may),
    `destination_open` (held while its destination's circuit is open) or
    `destination_disabled`. `attempted` with no `status`: the attempt was still in
    flight when the job moved on; it records itself (`attempt_deliveries`'s `on_outcomes`).
    """

    delivery_id: str
    attempted: bool
    status: str | None = None  # the delivery's status afterwards
    attempt: int | None = None
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    skipped: str | None = None
    # Due deliveries to enqueue: newer events of the same task that waited for this
    # attempt, and operational events it caused.
    follow_up_ids: tuple[str, ...] = ()


def record_attempts(
    session: Session,
    answered: Sequence[tuple[Claim, WebhookAnswer]],
    *,
    settings: Settings,
    now: datetime,
    settled: Sequence[Acknowledged] = (),
) -> list[DeliveryOutcome]:
    """Log the attempts; apply the outcome rules to the rows still ours, then free them.

    A row superseded, retried by hand or taken over meanwhile (its lease is not
    the claim's any more) only gets the attempt logged. One select, one insert
    and one update for the whole batch (a statement per set of equal values), and
    a select of the newer events to follow up only when there are some: few round
    trips (docs/decisions/0008-record-acknowledged-answers-at-once.md). `settled`:
    answers already recorded by `settle_acknowledged`, to count, log and follow up
    with the others.
    """
    recorded = [(row, answer) for row, answer, _ in settled]
    settled_rows = [row for row, _, _ in settled]
    newer_pending = {row.id for row, _, newer in settled if newer}
    outcomes: list[DeliveryOutcome] = []
    operational: list[str] = []
    if answered:
        gone, operational = _record(
            session, answered, settings, now, recorded, settled_rows, newer_pending
        )
        outcomes += gone
    follow_ups = waiting_newer_events(
        session, [delivery for delivery in settled_rows if delivery.id in newer_pending], now
    )
    if operational and recorded:
        first = recorded[0][0].id
        follow_ups[first] = (*follow_ups.get(first, ()), *operational)
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


def _record(
    session: Session,
    answered: Sequence[tuple[Claim, WebhookAnswer]],
    settings: Settings,
    now: datetime,
    recorded: list[tuple[DeliveryRow, WebhookAnswer]],
    settled: list[DeliveryRow],
    newer_pending: set[str],
) -> tuple[list[DeliveryOutcome], list[str]]:
    """Write the attempts and new states of `answered` under lock, and count them against
    their destinations; adds to `recorded`, `settled` and `newer_pending`. Returns the
    outcomes of deliveries gone meanwhile, and the operational events queued."""
    query = (
        select(*ROW_COLUMNS, newer_event_pending().label("newer_pending"))
        .where(among_ids([claim.id for claim, _ in answered], session))
        .order_by(WebhookDelivery.id)  # rows locked in one order: no deadlock between batches
    )
    if is_postgresql(session):
        query = query.with_for_update(of=WebhookDelivery)
    rows: dict[str, DeliveryRow] = {}
    for *columns, newer in session.execute(query):
        row = rows[columns[0]] = DeliveryRow(*columns)
        if newer:
            newer_pending.add(row.id)  # a row of a task with a newer event pending
    attempt_rows: list[dict[str, Any]] = []
    gone: list[DeliveryOutcome] = []
    written: list[DeliveryRow] = []
    tallies: dict[int, Tally] = {}
    troubled: list[tuple[DeliveryRow, WebhookAnswer]] = []
    for claim, answer in answered:
        if answer.refused is None and claim.destination_id:  # a refused one was never sent
            tally = tallies.setdefault(claim.destination_id, Tally())
            if answer.succeeded:
                tally.successes += 1
            else:
                tally.failures += 1
                tally.last_error = answer.error
        delivery = rows.get(claim.id)
        if delivery is None:  # the task (and its outbox) was deleted meanwhile
            gone.append(DeliveryOutcome(claim.id, attempted=True, error=answer.error))
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
                _apply_outcome(delivery, answer, settings=settings, now=now, probe=claim.probe)
                if not answer.succeeded:
                    troubled.append((delivery, answer))
            if delivery.status != DELIVERY_PENDING:
                settled.append(delivery)
        # Otherwise it was superseded, retried by hand or taken over meanwhile: only logged.
        delivery.updated_at = now
        recorded.append((delivery, answer))
        written.append(delivery)
    if written:
        insert_attempts(session, attempt_rows)
        write_rows(session, written)
    changes = record_destination_answers(session, tallies, settings=settings, now=now)
    events = delivery_events(session, troubled, now) + [
        destination_event(change) for change in changes
    ]
    # A recovered destination's held deliveries are due: rung at once with the events
    # (the jobs that take its slots then take the rest), not left to the next sweep.
    recovered = {
        (change.client_id, change.origin)
        for change in changes
        if change.event == DESTINATION_RECOVERED
    }
    released = next_due_ids(session, recovered, now=now) if recovered else []
    return gone, queue_operational_events(session, events, now=now) + released


def _count_attempt(delivery: DeliveryRow, answer: WebhookAnswer, now: datetime) -> None:
    metrics.DELIVERY_LATENCY.observe(answer.duration_ms / 1000)
    outcome = "retry" if delivery.status == DELIVERY_PENDING else delivery.status
    metrics.DELIVERIES.labels(outcome=outcome).inc()
    if delivery.status == DELIVERY_SUCCEEDED:
        # created_at is when the transition was observed: this is the client's wait.
        metrics.COMPLETION_TO_DELIVERY.observe((now - delivery.created_at).total_seconds())


def _apply_outcome(
    delivery: DeliveryRow,
    answer: WebhookAnswer,
    *,
    settings: Settings,
    now: datetime,
    probe: bool = False,
) -> None:
    """The outcome rules (docs/webhooks.md) for a pending delivery that was just attempted.

    A probe of an open destination that fails never exhausts its delivery: it is held
    with the others until the destination recovers (or is disabled)."""
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
    if delay is None and probe:
        delivery.next_attempt_at = now
        return
    if delay is None:
        _fail(
            delivery,
            "retries_exhausted",
            f"gave up after {delivery.attempts} attempts (TRACKER_WEBHOOK_RETRY_SCHEDULE); "
            f"last error: {answer.error}. Fix the receiver, then retry: {hint}",
        )
        return
    delivery.next_attempt_at = now + timedelta(seconds=delay)


def _fail(delivery: DeliveryRow, code: str, message: str) -> None:
    delivery.status = DELIVERY_FAILED
    delivery.next_attempt_at = None
    delivery.failure_code = code
    delivery.failure_message = message


# A 2xx answer to a delivery still leased by its attempt (nearly every answer), as
# `settle_acknowledged` reads it back: the row, its answer, and whether a newer event of
# its task is pending (it may have waited for this one).
Acknowledged = tuple[DeliveryRow, WebhookAnswer, bool]

# The delivery's new state and its attempt log row in one statement, for a batch of
# answers: rows locked in id order (as `record_attempts` does), only those still pending
# and leased by the claim that sent them.
_SETTLE_ACKNOWLEDGED_PG = text(
    f"""
    WITH answer AS (
        SELECT * FROM unnest(
            CAST(:id AS varchar[]), CAST(:lease AS timestamptz[]),
            CAST(:started_at AS timestamptz[]), CAST(:duration_ms AS integer[]),
            CAST(:status_code AS integer[]), CAST(:response_excerpt AS text[])
        ) AS a(id, lease, started_at, duration_ms, status_code, response_excerpt)
    ), locked AS (
        SELECT id FROM webhook_deliveries WHERE id IN (SELECT id FROM answer)
        ORDER BY id FOR UPDATE
    ), settled AS (
        UPDATE webhook_deliveries AS d
        SET status = :succeeded, attempts = d.attempts + 1, claimed_until = NULL,
            next_attempt_at = NULL, delivered_at = :now, updated_at = :now,
            last_status_code = answer.status_code, failure_code = NULL, failure_message = NULL
        FROM answer
        WHERE d.id IN (SELECT id FROM locked) AND d.id = answer.id
          AND d.status = :pending AND d.claimed_until = answer.lease
        RETURNING {", ".join(f"d.{name}" for name in DeliveryRow.__dataclass_fields__)},
            EXISTS (
                SELECT 1 FROM webhook_deliveries AS newer
                WHERE newer.task_row_id = d.task_row_id AND newer.created_at > d.created_at
                  AND newer.status = :pending
            ) AS newer_pending
    ), logged AS (
        INSERT INTO webhook_attempts ({", ".join(ATTEMPT_COLUMNS)})
        SELECT settled.id, settled.attempts, answer.started_at, answer.duration_ms,
            answer.status_code, answer.response_excerpt, NULL
        FROM settled JOIN answer ON answer.id = settled.id
    ), destination_answered AS (
        UPDATE webhook_destinations
        SET consecutive_failures = 0, failing_since = NULL, last_success_at = :now,
            updated_at = :now
        WHERE id IN (
            SELECT id FROM webhook_destinations
            WHERE id = ANY(CAST(:destination_ids AS bigint[])) AND state = :healthy
              AND (consecutive_failures > 0 OR last_success_at IS NULL
                   OR last_success_at < :fresh)
            ORDER BY id FOR UPDATE
        )
    )
    SELECT * FROM settled
    """
)


def settle_acknowledged(
    connection: Connection, answered: Sequence[tuple[Claim, WebhookAnswer]], *, now: datetime
) -> list[Acknowledged]:
    """PostgreSQL: record 2xx answers to rows still leased in one statement, autocommitted
    by the caller (docs/decisions/0008-record-acknowledged-answers-at-once.md). The same
    statement resets their healthy destinations' failure counts (and notes the success,
    at most once per `LAST_SUCCESS_RESOLUTION`).

    The answers it leaves (errors, a lease taken over, a probe of an open destination)
    go through `record_attempts`.
    """
    acknowledged = [
        (claim, answer) for claim, answer in answered if answer.succeeded and not claim.probe
    ]
    if not acknowledged:
        return []
    answers = {claim.id: answer for claim, answer in acknowledged}
    rows = connection.execute(
        _SETTLE_ACKNOWLEDGED_PG,
        {
            "id": [claim.id for claim, _ in acknowledged],
            "lease": [claim.lease for claim, _ in acknowledged],
            "started_at": [answer.started_at for _, answer in acknowledged],
            "duration_ms": [answer.duration_ms for _, answer in acknowledged],
            "status_code": [answer.status_code for _, answer in acknowledged],
            "response_excerpt": [answer.excerpt for _, answer in acknowledged],
            "now": now,
            "succeeded": DELIVERY_SUCCEEDED,
            "pending": DELIVERY_PENDING,
            "destination_ids": sorted({claim.destination_id for claim, _ in acknowledged}),
            "healthy": DESTINATION_HEALTHY,
            "fresh": now - LAST_SUCCESS_RESOLUTION,
        },
    )
    settled = []
    for *columns, newer in rows:
        row = DeliveryRow(*columns)
        settled.append((row, answers[row.id], bool(newer)))
    return settled
