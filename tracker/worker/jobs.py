"""Thin Celery jobs: ids in, call polling and delivery functions, ring doorbells, out.

What the jobs of a worker process share (settings, sessions, a poller per token) is
`tracker.worker.pollers`.

Jobs re-read every row they touch ("asserting the world is the job's
responsibility") and are safe to run twice, so a lost or duplicated message
costs at most a no-op.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from celery.signals import task_revoked, worker_shutting_down

from tracker.clock import utcnow
from tracker.config import Settings
from tracker.delivery.attempt import attempt_deliveries
from tracker.delivery.destinations import disable_failing_destinations
from tracker.delivery.operations import destination_event, queue_operational_events
from tracker.delivery.outbox import delivery_batches, due_delivery_ids
from tracker.delivery.outcome import DeliveryOutcome
from tracker.observability import metrics
from tracker.polling import (
    PollBatch,
    claim_due_tasks,
    claim_limit,
    claim_lookahead,
    dispatch_interval,
    plan_batches,
    poll_lease,
    release_batch,
    time_out_overdue_tasks,
)
from tracker.states import DELIVERY_PENDING
from tracker.tracking.retention import prune_history
from tracker.upstream.budget import (
    rejected_credentials,
)
from tracker.upstream.credentials import (
    client_credentials,
)
from tracker.worker.app import POLL_QUEUE, celery_app
from tracker.worker.doorbells import Doorbell
from tracker.worker.messages import PollBatchMessage, poll_batch_from_message, poll_batch_message
from tracker.worker.pollers import WorkerContext, poll_with_tokens, worker_context
from tracker.worker.roles import DEFAULT_CONCURRENCY

log = logging.getLogger("tracker.jobs")

# Deliveries due longer ago than this are rung again by the sweep: their doorbell was lost.
OVERDUE_DELIVERY_GRACE = 10.0
SWEEP_DELIVERY_LIMIT = 1000
# Retries due within this many seconds get a countdown doorbell of their own.
SHORT_RETRY = 60.0
# Most batches one poll job carries (see `poll_jobs`).
POLL_JOB_BATCHES = 8
# A `poll_now` job older than this is dropped: the regular ticks have polled by then.
POLL_NOW_EXPIRES = 5.0


def ring_delivery_doorbells(delivery_ids: Iterable[str], *, countdown: float = 0.0) -> None:
    """Ask workers to attempt these deliveries: due now, gathered with the other jobs' for
    a moment (`tracker.worker.doorbells`); due later, a job per batch with that countdown."""
    if not countdown:
        _doorbell.ring(delivery_ids)
        return
    for batch in delivery_batches(delivery_ids):
        _enqueue_deliveries(batch, countdown=countdown)


def _enqueue_deliveries(batch: list[str], *, countdown: float = 0.0) -> None:
    """One `deliver` job; the sweep covers a message that could not be sent."""
    try:
        deliver.apply_async((batch,), countdown=countdown or None)
    except Exception:  # the broker is down: the rows are due, the sweep will find them
        log.warning(
            "could not enqueue %d deliveries (%s, ...); the sweep will retry",
            len(batch),
            batch[0],
        )


_doorbell = Doorbell(_enqueue_deliveries)


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _ring_gathered_doorbells(**_: object) -> None:
    """A worker asked to stop sends what it gathered rather than leave it to the sweep."""
    _doorbell.flush()


@celery_app.task(name="tracker.dispatch_polls")  # type: ignore[untyped-decorator]
def dispatch_polls() -> int:
    """Beat tick: lease due tasks, enqueue poll jobs.

    Claims nothing while more than a lease's worth of jobs wait (`max_waiting_jobs`)
    (docs/decisions/0005-poll-backpressure-and-expiring-jobs.md).
    """
    ctx = worker_context()
    settings = ctx.settings
    waiting = polls_waiting(celery_app)
    if waiting > max_waiting_jobs(settings):
        log.info("%d poll jobs still wait for a worker; this tick claims nothing", waiting)
        return 0
    batches = claim_and_plan(ctx, utcnow())
    for job in poll_jobs(batches):
        enqueue_poll_job(job)
    return len(batches)


def claim_and_plan(
    ctx: WorkerContext, now: datetime, *, row_ids: Sequence[int] | None = None
) -> list[PollBatch]:
    """Claim due registrations (with `row_ids`: of those only) and plan their batches, per
    service and token.

    A token the upstream rejected is probed only once per max poll interval: its
    registrations are given back until then (when the tracker's token is the only one,
    the tick claims nothing at all, as it would only give everything back).
    """
    settings = ctx.settings
    pause = timedelta(seconds=settings.max_poll_interval)
    with ctx.sessions.begin() as session:
        rejected = rejected_credentials(session)
        paused = {key for key, at in rejected.items() if now - at < pause}
        if ctx.credential in paused and not client_credentials(session):
            return []
        claimed = claim_due_tasks(
            session,
            now=now,
            limit=claim_limit(settings) if row_ids is None else len(row_ids),
            settings=settings,
            lookahead=claim_lookahead(settings) if row_ids is None else 0.0,
            row_ids=row_ids,
        )
        batches = plan_batches(claimed, settings.batch_size, probing=set(rejected), paused=paused)
        held = [batch for batch in batches if batch.credential in paused]
        for batch in held:
            assert batch.credential is not None
            release_batch(session, batch, retry_at=rejected[batch.credential] + pause)
    for claim in claimed:
        metrics.POLL_LAG.observe(max(0.0, (now - claim.due_at).total_seconds()))
    return [batch for batch in batches if batch.credential not in paused]


def enqueue_poll_job(job: Sequence[PollBatch], app: Celery = celery_app) -> None:
    """One `poll_batches` message, expiring with its lease: a late job is discarded unread.

    The next tick claims its tasks again
    (docs/decisions/0005-poll-backpressure-and-expiring-jobs.md).
    """
    leases = [batch.lease_until for batch in job]
    expires = None if None in leases else max(lease for lease in leases if lease is not None)
    app.send_task(
        poll_batches.name, args=([poll_batch_message(batch) for batch in job],), expires=expires
    )


@task_revoked.connect  # type: ignore[untyped-decorator]
def _count_expired_poll_job(
    sender: object = None, request: Any = None, expired: bool = False, **_: object
) -> None:
    """Count, and log, a poll job a worker discarded because its lease had ended."""
    if expired and getattr(sender, "name", None) == poll_batches.name:
        metrics.POLL_JOBS_EXPIRED.inc()
        log.warning(
            "a poll job reached a worker after its lease ended and was discarded; the next "
            "tick claims its tasks again (workers are behind: add workers if this recurs)"
        )


def polls_waiting(app: Celery) -> int:
    """Poll jobs queued in the broker and not yet taken by a worker; 0 if it cannot say."""
    try:
        with app.connection_or_acquire() as connection:
            declared = connection.default_channel.queue_declare(queue=POLL_QUEUE, passive=True)
    except Exception:  # no such queue yet (nothing queued), or the broker is away
        return 0
    return int(declared.message_count)


def jobs_per_tick(settings: Settings, threads: int = DEFAULT_CONCURRENCY) -> int:
    """Poll jobs a tick makes when it claims all it may (`claim_limit`; see `poll_jobs`)."""
    batches = math.ceil(claim_limit(settings) / settings.batch_size)
    return math.ceil(batches / _batches_per_job(batches, threads))


def max_waiting_jobs(settings: Settings) -> int:
    """Poll jobs that may wait in the broker before a tick stops claiming: those the ticks
    of one lease make at most."""
    ticks = poll_lease(settings, claim_lookahead(settings)) / dispatch_interval(settings)
    return math.ceil(jobs_per_tick(settings) * ticks)


def _batches_per_job(batches: int, threads: int) -> int:
    return max(1, min(POLL_JOB_BATCHES, batches // threads))


def poll_jobs(
    batches: list[PollBatch], threads: int = DEFAULT_CONCURRENCY
) -> list[list[PollBatch]]:
    """A tick's batches as poll jobs: one each up to the worker's threads, then up to
    POLL_JOB_BATCHES each (docs/decisions/0004-poll-jobs-carry-batches.md)."""
    per_job = _batches_per_job(len(batches), threads)
    return [batches[start : start + per_job] for start in range(0, len(batches), per_job)]


@celery_app.task(name="tracker.poll_batches")  # type: ignore[untyped-decorator]
def poll_batches(batches: list[PollBatchMessage]) -> None:
    """Poll batches one after another, each claimed at its tick with its lease.

    Only answers that change what the claim saw are written; rows leased since by
    another worker are skipped. Each batch's doorbells ring as soon as it is applied.
    """
    ctx = worker_context()
    for outcome in poll_with_tokens(ctx, [poll_batch_from_message(m) for m in batches]):
        ring_delivery_doorbells(outcome.applied.delivery_ids)


def _enqueue_poll_now(row_ids: list[int]) -> None:
    """One `poll_now` job for the registrations doorbells made due; the next tick covers a
    lost one."""
    try:
        poll_now.apply_async((row_ids,), expires=POLL_NOW_EXPIRES)
    except Exception:  # the broker is down: the tasks are due, the next tick finds them
        log.warning("could not enqueue a poll for %d rung tasks; the next tick will", len(row_ids))


def ring_poll_doorbell(task_row_ids: Iterable[int]) -> None:
    """Ask a worker to poll these registrations now: the upstream's callbacks made them due
    (`tracker.polling.doorbell`; the API gathers them, so one job serves many)."""
    _enqueue_poll_now(list(task_row_ids))


@celery_app.task(name="tracker.poll_now")  # type: ignore[untyped-decorator]
def poll_now(task_row_ids: list[int]) -> int:
    """Poll, in this job, the registrations a doorbell made due: a claim of those rows alone
    (if still due and not leased: leases keep it safe beside the ticks), then their
    batches, within their tokens' request budgets. One broker hop, so completion reaches
    its webhook in about one round trip; the ticks' own claims are left as they are."""
    ctx = worker_context()
    batches = claim_and_plan(ctx, utcnow(), row_ids=task_row_ids)
    for outcome in poll_with_tokens(ctx, batches):
        ring_delivery_doorbells(outcome.applied.delivery_ids)
    return len(batches)


@celery_app.task(name="tracker.sweep")  # type: ignore[untyped-decorator]
def sweep() -> None:
    """Beat tick: time out overdue tasks, disable destinations failing too long, and ring
    again for deliveries whose doorbell was lost (fairly across destinations)."""
    ctx = worker_context()
    now = utcnow()
    with ctx.sessions.begin() as session:
        timed_out = time_out_overdue_tasks(session, now=now, settings=ctx.settings)
    ring_delivery_doorbells(timed_out)
    with ctx.sessions.begin() as session:
        changes = disable_failing_destinations(session, settings=ctx.settings, now=now)
        events = queue_operational_events(
            session, [destination_event(change) for change in changes], now=now
        )
    for change in changes:
        log.warning(
            "destination %s of client %d failed without a success for %g s and is disabled; "
            "its deliveries end failed until it is resumed or they are replayed",
            change.origin,
            change.client_id,
            ctx.settings.destination_disable_after,
        )
    ring_delivery_doorbells(events)
    with ctx.sessions.begin() as session:
        overdue = due_delivery_ids(
            session,
            now=now - timedelta(seconds=OVERDUE_DELIVERY_GRACE),
            probes_at=now,  # a probe has no doorbell: it goes when due
            limit=SWEEP_DELIVERY_LIMIT,
            per_destination=ctx.settings.destination_concurrency,
        )
    ring_delivery_doorbells(overdue)


@celery_app.task(name="tracker.prune")  # type: ignore[untyped-decorator]
def prune() -> None:
    """Daily beat tick: with TRACKER_RETENTION_DAYS set, prune terminal tasks older than that,
    in bounded batches, each its own short transaction."""
    ctx = worker_context()
    days = ctx.settings.retention_days
    if days <= 0:
        return
    pruned = prune_history(ctx.sessions, older_than=timedelta(days=days), now=utcnow())
    log.info(
        "retention: pruned %d tasks and %d operational events older than %g days",
        pruned.tasks,
        pruned.operational_events,
        days,
    )


# A deliver job returns once no answer came for this long and nothing is left to take;
# slower answers record themselves, so a slow destination holds no job thread.
DELIVERY_HAND_OFF = 0.5


@celery_app.task(name="tracker.deliver")  # type: ignore[untyped-decorator]
def deliver(delivery_ids: list[str]) -> None:
    """Attempt a batch of deliveries, and the next ones of destinations with a backlog."""
    ctx = worker_context()
    outcomes = attempt_deliveries(
        ctx.sessions,
        delivery_ids,
        settings=ctx.settings,
        pump=True,
        hand_off_after=DELIVERY_HAND_OFF,
        on_outcomes=follow_up,
    )
    follow_up(outcomes)


def follow_up(outcomes: Sequence[DeliveryOutcome]) -> None:
    """Ring what attempts leave due: newer events they held back, operational events they
    caused, and their retries due within a minute."""
    # Newer events of the tasks held back by the order rule are due now.
    ring_delivery_doorbells(i for outcome in outcomes for i in outcome.follow_up_ids)
    # Short retries are rung with a countdown, one doorbell per second they fall due in;
    # long ones are left to the sweep, since Redis re-delivers messages held longer than
    # its visibility timeout.
    now = utcnow()
    retries: dict[int, list[str]] = {}
    for outcome in outcomes:
        if outcome.status == DELIVERY_PENDING and outcome.next_attempt_at is not None:
            delay = (outcome.next_attempt_at - now).total_seconds()
            if delay <= SHORT_RETRY:
                retries.setdefault(max(0, math.ceil(delay)), []).append(outcome.delivery_id)
    for delay_seconds, retry_ids in retries.items():
        ring_delivery_doorbells(retry_ids, countdown=delay_seconds)
