"""Polling: claim due tasks, batch distinct upstream ids, apply the answers.

One tick: `claim_due_tasks` leases the due registrations in one statement,
`plan_batches` groups them by service and takes each upstream id once however
many clients watch it, and each batch is polled by `run_poll_batch`:
budget slot, one `retrieve_batch` call, then `apply_batch_answer` in one
transaction (state changes, history rows, outbox rows, next poll times).
Nothing here knows about Celery or HTTP routes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol, cast

from sqlalchemy import String, Table, any_, bindparam, literal_column, or_, select, true, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

from tracker.budget import (
    Budget,
    BudgetUnavailable,
    clear_rejected,
    mark_rejected,
)
from tracker.config import Settings
from tracker.db import is_postgresql
from tracker.errors import UpstreamAuthError, UpstreamError, UpstreamRateLimited
from tracker.history import record_transition
from tracker.models import Task
from tracker.states import (
    ACTIVE_STATES,
    FAILED,
    TIMED_OUT,
    Failure,
    Observation,
    can_transition,
    is_terminal,
    normalise,
)
from tracker.timeutil import utcnow

log = logging.getLogger("tracker.polling")

# Polls back off in proportion to a task's age: a task running for 10 minutes is
# polled every 30 s (5 % of its age), bounded by the poll interval settings.
BACKOFF_SHARE_OF_AGE = 0.05
# Beat dispatches due polls this often (or every poll interval, if shorter). Each task
# keeps the phase of the tick that first claimed it, so ticks more frequent than the
# poll interval spread the tasks' polls over it instead of handing all of them to the
# workers at once, every poll interval.
DISPATCH_INTERVAL = 1.0
# How long a poll waits for its upstream slot before giving the batch back.
MAX_BUDGET_WAIT = 10.0
DEFAULT_RATE_LIMIT_PAUSE = 5.0


class TaskUpstream(Protocol):
    """The part of `tracker.upstream.UpstreamClient` polling needs."""

    def retrieve(self, service: str, task_id: str) -> dict[str, Any] | None: ...

    def retrieve_batch(self, service: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...


class Claim(NamedTuple):
    """A leased registration: which upstream id, when its poll was due, until when it is ours."""

    service: str
    task_id: str
    due_at: datetime
    lease_until: datetime | None = None
    claimed_at: datetime | None = None


@dataclass(frozen=True)
class PollBatch:
    """Distinct upstream ids of one service, polled with one `retrieve_batch` call.

    `lease_until` is the `claimed_until` the claim wrote: a registration leased
    since by another worker (its lease differs and is live) is not written.
    `claimed_at` is the tick that claimed it: the next poll is counted from there,
    not from the answer, so a task keeps its place in the ticks' rhythm however
    long the job waited (counted from the answer, it would fall just after the
    next tick and be polled every other tick).
    """

    service: str
    task_ids: tuple[str, ...]
    lease_until: datetime | None = None
    claimed_at: datetime | None = None


@dataclass
class BatchApplied:
    """What applying one answer did."""

    observed: int = 0
    transitions: int = 0
    delivery_ids: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # reached TRACKER_NOT_FOUND_AFTER


@dataclass
class PollOutcome:
    """What polling one batch did; `error` names why its answer was not applied, if so."""

    applied: BatchApplied = field(default_factory=BatchApplied)
    error: str | None = None


def dispatch_interval(settings: Settings) -> float:
    """Seconds between two dispatch ticks of beat."""
    return min(DISPATCH_INTERVAL, settings.poll_interval)


def claim_limit(settings: Settings) -> int:
    """Registrations one tick may claim: what the upstream budget can serve until the next tick."""
    requests = max(1, int(settings.upstream_rps * dispatch_interval(settings)))
    return requests * settings.batch_size


def next_poll_at(created_at: datetime, now: datetime, settings: Settings) -> datetime:
    """Fresh tasks are polled every poll interval; older ones back off to the maximum."""
    age = (now - created_at).total_seconds()
    interval = min(
        settings.max_poll_interval, max(settings.poll_interval, age * BACKOFF_SHARE_OF_AGE)
    )
    return now + timedelta(seconds=interval)


def claim_lookahead(settings: Settings) -> float:
    """Seconds ahead of a tick whose due polls it takes (a quarter of the tick interval):
    beat and the broker move a tick by some milliseconds either way, and a poll due just
    after its tick would otherwise wait a whole tick."""
    return dispatch_interval(settings) / 4


def claim_due_tasks(
    session: Session, *, now: datetime, limit: int, lease_seconds: float, lookahead: float = 0.0
) -> list[Claim]:
    """Lease up to `limit` registrations due by `now` (plus `lookahead` s) in one statement."""
    due = (
        select(Task.id)
        .where(
            Task.next_poll_at <= now + timedelta(seconds=lookahead),
            or_(Task.claimed_until.is_(None), Task.claimed_until < now),
        )
        .order_by(Task.next_poll_at)
        .limit(limit)
    )
    if is_postgresql(session):
        due = due.with_for_update(skip_locked=True)
    lease_until = now + timedelta(seconds=lease_seconds)
    claimed = session.execute(
        update(Task)
        .where(Task.id.in_(due.scalar_subquery()))
        .values(claimed_until=lease_until)
        .returning(Task.service, Task.task_id, Task.next_poll_at)
        .execution_options(synchronize_session=False)
    )
    # next_poll_at is set on every row the claim matched (it was compared with now).
    return [
        Claim(service, task_id, due_at or now, lease_until, now)
        for service, task_id, due_at in claimed
    ]


def plan_batches(claimed: Iterable[Claim], batch_size: int) -> list[PollBatch]:
    """Group claimed registrations by service, each upstream id once, `batch_size` per batch."""
    by_service: dict[tuple[str, datetime | None, datetime | None], dict[str, None]]
    by_service = defaultdict(dict)
    for claim in claimed:
        key = (claim.service, claim.lease_until, claim.claimed_at)
        by_service[key][claim.task_id] = None  # a dict keeps first-seen order, unlike a set
    batches = []
    for (service, lease_until, claimed_at), ids in by_service.items():
        distinct = list(ids)
        for start in range(0, len(distinct), batch_size):
            chunk = tuple(distinct[start : start + batch_size])
            batches.append(PollBatch(service, chunk, lease_until, claimed_at))
    return batches


class _Polled(NamedTuple):
    """The columns of a registration that a poll answer is compared with."""

    id: int
    task_id: str
    state: str
    upstream_state: str | None
    polls: int
    misses: int
    created_at: datetime
    claimed_until: datetime | None


def _active_registrations(session: Session, service: str, task_ids: Sequence[str]) -> list[Task]:
    query = select(Task).where(
        Task.service == service, Task.task_id.in_(task_ids), Task.state.in_(ACTIVE_STATES)
    )
    if is_postgresql(session):
        query = query.with_for_update()
    return list(session.scalars(query.order_by(Task.id)))


# What a poll reads of each active registration of its ids, locked. The statements
# are built once: the ids go as one parameter (an array on PostgreSQL, so the text
# is the same for every batch and psycopg prepares it), the active states inline.
_ACTIVE = Task.state.in_([literal_column(f"'{state}'") for state in sorted(ACTIVE_STATES)])
_POLLED = select(
    Task.id,
    Task.task_id,
    Task.state,
    Task.upstream_state,
    Task.polls,
    Task.misses,
    Task.created_at,
    Task.claimed_until,
).order_by(Task.id)
_LOCK_POSTGRESQL = _POLLED.where(
    Task.service == bindparam("service"),
    Task.task_id == any_(bindparam("task_ids", type_=ARRAY(String))),
    _ACTIVE,
).with_for_update()
_LOCK_SQLITE = _POLLED.where(
    Task.service == bindparam("service"),
    Task.task_id.in_(bindparam("task_ids", expanding=True)),
    _ACTIVE,
)


def _lock_active_registrations(
    session: Session, service: str, task_ids: Sequence[str]
) -> list[_Polled]:
    """The active registrations of `task_ids`, locked: only the columns a poll compares."""
    query = _LOCK_POSTGRESQL if is_postgresql(session) else _LOCK_SQLITE
    session.flush()  # what Session.execute would do; plain rows need no ORM loading
    rows = session.connection().execute(query, {"service": service, "task_ids": list(task_ids)})
    return [_Polled(*row) for row in rows]


def _leased_by_another(row: _Polled, lease_until: datetime | None, now: datetime) -> bool:
    """Another worker holds a live lease on this row: its own poll will write it, not this one."""
    return (
        lease_until is not None
        and row.claimed_until is not None
        and row.claimed_until != lease_until
        and row.claimed_until > now
    )


def apply_batch_answer(
    session: Session,
    batch: PollBatch,
    records: Mapping[str, dict[str, Any]],
    *,
    now: datetime,
    settings: Settings,
) -> BatchApplied:
    """Apply one `retrieve_batch` answer to every active registration of the batch's ids.

    Most answers change nothing but the poll schedule: those registrations are read
    as plain columns and written by one set-based UPDATE. Only a registration whose
    state or upstream word changes is loaded as a `Task` for `record_transition`.
    Registrations another worker has leased since are left to that worker.
    """
    applied = BatchApplied()
    scheduled_from = batch.claimed_at or now

    def scheduled(row: _Polled) -> datetime:
        return next_poll_at(row.created_at, scheduled_from, settings)

    unchanged: list[_Rescheduled] = []
    changed: dict[int, tuple[dict[str, Any], Observation]] = {}
    for row in _lock_active_registrations(session, batch.service, batch.task_ids):
        if _leased_by_another(row, batch.lease_until, now):
            continue
        applied.observed += 1
        record = records.get(row.task_id)
        if record is None:
            misses = row.misses + 1
            if misses >= settings.not_found_after and row.task_id not in applied.missing:
                applied.missing.append(row.task_id)
            unchanged.append(_Rescheduled(row.id, row.polls, misses, scheduled(row)))
            continue
        observation = normalise(record)
        if (
            observation.state is not None and can_transition(row.state, observation.state)
        ) or observation.upstream_state not in (None, row.upstream_state):
            changed[row.id] = (record, observation)
        else:
            unchanged.append(_Rescheduled(row.id, row.polls + 1, 0, scheduled(row)))
    if changed:
        _apply_changes(
            session, changed, applied, now=now, scheduled_from=scheduled_from, settings=settings
        )
    if unchanged:
        _reschedule(session, unchanged)
    return applied


class _Rescheduled(NamedTuple):
    """A registration the answer did not change: new counters and next poll time."""

    id: int
    polls: int
    misses: int
    next_poll_at: datetime


def _apply_changes(
    session: Session,
    changed: Mapping[int, tuple[dict[str, Any], Observation]],
    applied: BatchApplied,
    *,
    now: datetime,
    scheduled_from: datetime,
    settings: Settings,
) -> None:
    """New states (history and outbox through `record_transition`) and new upstream words."""
    # populate_existing: objects already in the session take the values just read under lock.
    tasks = session.scalars(
        select(Task)
        .where(Task.id.in_(changed))
        .order_by(Task.id)
        .execution_options(populate_existing=True)
    )
    for task in tasks:
        record, observation = changed[task.id]
        if observation.state is not None and can_transition(task.state, observation.state):
            task.polls += 1
            task.misses = 0
            applied.delivery_ids += [
                delivery.id
                for delivery in record_transition(
                    session,
                    task,
                    observation.state,
                    observed_at=now,
                    upstream_state=observation.upstream_state,
                    record=record,
                    failure=observation.failure,
                )
            ]
            applied.transitions += 1
            if not is_terminal(task.state):
                task.next_poll_at = next_poll_at(task.created_at, scheduled_from, settings)
                task.claimed_until = None
        else:
            # A new upstream word, same state (queued -> pending): keep it, no history row.
            task.upstream_state, task.record, task.updated_at = (
                observation.upstream_state,
                record,
                now,
            )
            task.polls += 1
            task.misses = 0
            task.next_poll_at = next_poll_at(task.created_at, scheduled_from, settings)
            task.claimed_until = None


# One statement for every registration of a batch the answer did not change. The
# arrays go in psycopg's binary format (`%(...)b`): dumping 50 timestamps as text
# costs more CPU than the rest of the statement.
_RESCHEDULE_POSTGRESQL = """
    UPDATE tasks
    SET polls = v.polls, misses = v.misses, next_poll_at = v.next_poll_at, claimed_until = NULL
    FROM unnest(
        CAST(%(ids)b AS bigint[]), CAST(%(polls)b AS integer[]), CAST(%(misses)b AS integer[]),
        CAST(%(next_poll_at)b AS timestamptz[])
    ) AS v(id, polls, misses, next_poll_at)
    WHERE tasks.id = v.id
"""
_TASKS = cast(Table, Task.__table__)
_RESCHEDULE = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("row_id"))
    .values(
        polls=bindparam("new_polls"),
        misses=bindparam("new_misses"),
        next_poll_at=bindparam("new_next_poll_at"),
        claimed_until=None,
    )
)


def _reschedule(session: Session, rows: Sequence[_Rescheduled]) -> None:
    """Write the poll counters and next poll times of unchanged registrations, set-based."""
    if is_postgresql(session):
        session.connection().exec_driver_sql(
            _RESCHEDULE_POSTGRESQL,
            {
                "ids": [r.id for r in rows],
                "polls": [r.polls for r in rows],
                "misses": [r.misses for r in rows],
                "next_poll_at": [r.next_poll_at for r in rows],
            },
        )
        return
    # SQLite runs in process: an executemany costs no round trips.
    session.connection().execute(
        _RESCHEDULE,
        [
            {
                "row_id": r.id,
                "new_polls": r.polls,
                "new_misses": r.misses,
                "new_next_poll_at": r.next_poll_at,
            }
            for r in rows
        ],
    )


def fail_not_found(
    session: Session, service: str, task_id: str, *, now: datetime, misses: int
) -> list[str]:
    """Fail every active registration of an id the upstream no longer knows."""
    failure = Failure(
        "not_found",
        f"the upstream has no task {task_id!r} of service {service!r}: it was missing from "
        f"{misses} batch answers and a single retrieve confirmed it",
    )
    delivery_ids: list[str] = []
    for task in _active_registrations(session, service, [task_id]):
        delivery_ids += [
            d.id for d in record_transition(session, task, FAILED, observed_at=now, failure=failure)
        ]
    return delivery_ids


def release_batch(session: Session, batch: PollBatch, *, retry_at: datetime) -> None:
    """Give a batch's leases back, to be polled again at `retry_at` (upstream trouble)."""
    mine = (
        or_(Task.claimed_until.is_(None), Task.claimed_until == batch.lease_until)
        if batch.lease_until is not None
        else true()
    )
    session.execute(
        update(Task)
        .where(
            Task.service == batch.service,
            Task.task_id.in_(batch.task_ids),
            Task.state.in_(ACTIVE_STATES),
            mine,
        )
        .values(claimed_until=None, next_poll_at=retry_at)
        .execution_options(synchronize_session=False)
    )


def time_out_overdue_tasks(session: Session, *, now: datetime, limit: int = 500) -> list[str]:
    """Tasks past their deadline become `timed_out`; returns the new delivery ids."""
    query = (
        select(Task)
        .where(Task.deadline_at <= now, Task.state.in_(ACTIVE_STATES))
        .order_by(Task.deadline_at)
        .limit(limit)
    )
    if is_postgresql(session):
        query = query.with_for_update(skip_locked=True)
    delivery_ids: list[str] = []
    for task in session.scalars(query):
        failure = Failure(
            "timed_out", f"no terminal state within {task.timeout_seconds} s of registration"
        )
        delivery_ids += [
            d.id
            for d in record_transition(session, task, TIMED_OUT, observed_at=now, failure=failure)
        ]
    return delivery_ids


def run_poll_batch(
    sessions: sessionmaker[Session],
    upstream: TaskUpstream,
    budget: Budget,
    batch: PollBatch,
    *,
    settings: Settings,
    credential: str,
    now: Callable[[], datetime] = utcnow,
) -> PollOutcome:
    """Poll one batch: budget, one upstream call, then one transaction applying the answer.

    Upstream trouble never fails a task: the batch's leases are given back with a
    delay (a 429 also pauses the whole token; a rejected token is recorded for
    `/readyz` and logged once). A batch whose lease ran out before its turn (its
    job waited behind a slow upstream or a broker outage) is not polled: a tick
    claims it again, and polling it here too would ask the upstream twice.
    """
    outcome = PollOutcome()
    if batch.lease_until is not None and batch.lease_until <= now():
        log.warning(
            "the lease of %d %s ids ran out before their poll; the next tick claims them",
            len(batch.task_ids),
            batch.service,
        )
        outcome.error = "lease_expired"
        return outcome
    try:
        records = upstream.retrieve_batch(batch.service, batch.task_ids)
    except (BudgetUnavailable, UpstreamError) as exc:
        outcome.error = _handle_upstream_trouble(
            sessions, budget, batch, exc, settings, credential, now()
        )
        return outcome

    with sessions.begin() as session:
        if clear_rejected(session, credential):
            log.warning("upstream accepts the token again; polling resumes")
        outcome.applied = apply_batch_answer(session, batch, records, now=now(), settings=settings)

    for task_id in outcome.applied.missing:
        outcome.applied.delivery_ids += _confirm_missing(
            sessions,
            upstream,
            budget,
            batch.service,
            task_id,
            settings,
            credential,
            now,
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
    now: Callable[[], datetime],
    lease_until: datetime | None,
) -> list[str]:
    """A single `retrieve` decides whether an id missing from batch answers exists."""
    single = PollBatch(service, (task_id,), lease_until)
    try:
        record = upstream.retrieve(service, task_id)
    except (BudgetUnavailable, UpstreamError) as exc:
        _handle_upstream_trouble(sessions, budget, single, exc, settings, credential, now())
        return []
    with sessions.begin() as session:
        if record is None:
            log.info("task not found upstream", extra={"service": service, "task_id": task_id})
            return fail_not_found(
                session, service, task_id, now=now(), misses=settings.not_found_after
            )
        return apply_batch_answer(
            session, single, {task_id: record}, now=now(), settings=settings
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
        pause = exc.retry_after if exc.retry_after is not None else DEFAULT_RATE_LIMIT_PAUSE
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
                "the upstream rejected TRACKER_UPSTREAM_TOKEN (%s); polling is paused and "
                "/readyz answers 503 until a request with the token succeeds again",
                exc,
            )
        release_batch(session, batch, retry_at=retry_at)
    return kind
