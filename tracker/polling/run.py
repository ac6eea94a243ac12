"""Polling one job's batches: the request budget, the upstream call, the answer applied."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from tracker.clock import utcnow
from tracker.config import Settings
from tracker.errors import BudgetUnavailable, UpstreamAuthError, UpstreamError, UpstreamRateLimited
from tracker.observability import metrics
from tracker.polling.apply import apply_batch_answer, fail_not_found
from tracker.polling.batches import PollBatch, PollOutcome
from tracker.polling.claim import release_batch, renew_lease
from tracker.upstream.budget import (
    Budget,
    bounded_pause,
    clear_rejected,
    mark_rejected,
    slots_ahead,
)

log = logging.getLogger("tracker.polling")


# How long a poll waits for its upstream slot before giving the batch back.
MAX_BUDGET_WAIT = 10.0
DEFAULT_RATE_LIMIT_PAUSE = 5.0


class TaskUpstream(Protocol):
    """The part of `tracker.upstream.client.UpstreamClient` polling needs."""

    def retrieve(self, service: str, task_id: str) -> dict[str, Any] | None: ...

    def retrieve_batch(self, service: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...


def run_poll_job(
    sessions: sessionmaker[Session],
    upstream: TaskUpstream,
    budget: Budget,
    batches: Sequence[PollBatch],
    *,
    settings: Settings,
    credential: str,
) -> Iterator[PollOutcome]:
    """Poll a job's batches one after another (`run_poll_batch`), yielding each outcome.

    The job's request slots are reserved at once; once a batch fails (upstream trouble,
    a lease run out), the rest reserve theirs one by one, so that they wait out a 429.
    """
    with slots_ahead(budget, len(batches), max_wait=MAX_BUDGET_WAIT) as ahead:
        for batch in batches:
            outcome = run_poll_batch(
                sessions, upstream, budget, batch, settings=settings, credential=credential
            )
            if outcome.error is not None and ahead is not None:
                ahead.drop()
            yield outcome


def run_poll_batch(
    sessions: sessionmaker[Session],
    upstream: TaskUpstream,
    budget: Budget,
    batch: PollBatch,
    *,
    settings: Settings,
    credential: str,
    clock: Callable[[], datetime] = utcnow,
) -> PollOutcome:
    """Poll one batch: budget, one upstream call, then one transaction applying the answer.

    Upstream trouble never fails a task: the batch's leases are given back with a
    delay (a 429 also pauses the whole token; a rejected token is recorded for
    `/readyz` and logged once). A batch whose lease ran out before its turn (its
    job waited behind a slow upstream or a broker outage) is not polled: a tick
    claims it again, and polling it here too would ask the upstream twice.
    """
    outcome = PollOutcome()
    if batch.lease_until is not None and batch.lease_until <= clock():
        with sessions.begin() as session:
            batch = renew_lease(session, batch, now=clock(), settings=settings)
        if not batch.task_ids:
            outcome.error = "lease_expired"
            return outcome
    try:
        records = upstream.retrieve_batch(batch.service, batch.task_ids)
    except (BudgetUnavailable, UpstreamError) as exc:
        outcome.error = _handle_upstream_trouble(
            sessions, budget, batch, exc, settings, credential, clock()
        )
        return outcome

    # A session opens no connection until its first statement: an answer that changes
    # nothing the claim saw costs the database nothing.
    with sessions.begin() as session:
        if (batch.probe or batch.seen is None) and clear_rejected(session, credential):
            log.warning("upstream accepts the token again; polling resumes")
        outcome.applied = apply_batch_answer(
            session, batch, records, now=clock(), settings=settings
        )
    metrics.POLL_OBSERVATIONS.inc(outcome.applied.observed)

    for task_id in outcome.applied.missing:
        outcome.applied.delivery_ids += _confirm_missing(
            sessions,
            upstream,
            budget,
            batch.service,
            task_id,
            settings,
            credential,
            clock,
            batch.lease_until,
        )
    return outcome


def _confirm_missing(
    sessions: sessionmaker[Session],
    upstream: TaskUpstream,
    budget: Budget,
    service: str,
    task_id: str,
    settings: Settings,
    credential: str,
    clock: Callable[[], datetime],
    lease_until: datetime | None,
) -> list[str]:
    """A single `retrieve` decides whether an id missing from batch answers exists."""
    single = PollBatch(service, (task_id,), lease_until)
    try:
        record = upstream.retrieve(service, task_id)
    except (BudgetUnavailable, UpstreamError) as exc:
        _handle_upstream_trouble(sessions, budget, single, exc, settings, credential, clock())
        return []
    with sessions.begin() as session:
        if record is None:
            log.info("task not found upstream", extra={"service": service, "task_id": task_id})
            return fail_not_found(
                session, service, task_id, now=clock(), misses=settings.not_found_after
            )
        return apply_batch_answer(
            session, single, {task_id: record}, now=clock(), settings=settings
        ).delivery_ids


def _handle_upstream_trouble(
    sessions: sessionmaker[Session],
    budget: Budget,
    batch: PollBatch,
    exc: Exception,
    settings: Settings,
    credential: str,
    now: datetime,
) -> str:
    """Give the batch back with the right delay for what went wrong; returns the error's name."""
    if isinstance(exc, BudgetUnavailable):
        retry_at = exc.retry_at
        kind = "budget"
    elif isinstance(exc, UpstreamRateLimited):
        # The client bounds a Retry-After by TRACKER_MAX_POLL_INTERVAL (and logs a clamp).
        pause = exc.retry_after if exc.retry_after is not None else DEFAULT_RATE_LIMIT_PAUSE
        pause = bounded_pause(pause, settings.max_poll_interval)
        budget.pause(pause)
        retry_at = now + timedelta(seconds=pause)
        kind = "rate_limited"
        log.warning("upstream answered 429; pausing the token for %.1f s", pause)
    elif isinstance(exc, UpstreamAuthError):
        retry_at = now + timedelta(seconds=settings.max_poll_interval)
        kind = "auth_rejected"
    else:
        retry_at = now + timedelta(
            seconds=min(settings.max_poll_interval, 2 * settings.poll_interval)
        )
        kind = "upstream_error"
        log.warning("upstream error for %d ids: %s", len(batch.task_ids), exc)
    with sessions.begin() as session:
        if isinstance(exc, UpstreamAuthError) and mark_rejected(
            session, credential, str(exc), now=now
        ):
            log.error(
                "the upstream rejected the token %s (%s); polling with it is paused until a "
                "request with it succeeds again (/readyz names it)",
                credential,
                exc,
            )
        release_batch(session, batch, retry_at=retry_at)
    return kind
