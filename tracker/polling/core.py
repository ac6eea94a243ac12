"""Polling: claim due tasks, batch distinct upstream ids, apply the answers.

One tick: `claim_due_tasks` leases the due registrations, counts their polls
and sets their next ones, noting what it saw of each; `plan_batches` groups them
by service and takes each upstream id once however many clients watch it, and
each batch is polled by `run_poll_batch`: budget slot, one `retrieve_batch`
call, then `apply_batch_answer` in one transaction, which writes only what the
answer changes (state changes, history rows, outbox rows, misses): most answers
write nothing. Nothing here knows about Celery or HTTP routes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol

from sqlalchemy import (
    String,
    any_,
    bindparam,
    case,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, sessionmaker

from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.engine import is_postgresql
from tracker.db.models import Task, task_schedule_table, tasks_table
from tracker.errors import UpstreamAuthError, UpstreamError, UpstreamRateLimited
from tracker.observability import metrics
from tracker.states import (
    ACTIVE_STATES,
    FAILED,
    TIMED_OUT,
    Failure,
    Observation,
    can_transition,
    normalise,
)
from tracker.tracking.transitions import record_transition
from tracker.upstream.budget import (
    Budget,
    BudgetUnavailable,
    clear_rejected,
    mark_rejected,
    slots_ahead,
)

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
    """The part of `tracker.upstream.client.UpstreamClient` polling needs."""

    def retrieve(self, service: str, task_id: str) -> dict[str, Any] | None: ...

    def retrieve_batch(self, service: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...


class Seen(NamedTuple):
    """What a claim read of one registration: what its poll's answer is compared with."""

    state: str
    upstream_state: str | None
    misses: int


class Claim(NamedTuple):
    """A leased registration: which upstream id, when its poll was due, until when it is ours,
    and what it was when claimed (`seen`)."""

    service: str
    task_id: str
    due_at: datetime
    lease_until: datetime | None = None
    claimed_at: datetime | None = None
    seen: Seen | None = None


@dataclass(frozen=True)
class PollBatch:
    """Distinct upstream ids of one service, polled with one `retrieve_batch` call.

    `lease_until` is the `claimed_until` the claim wrote: a registration leased
    since by another worker (its lease differs and is live) is not written.
    `claimed_at` is the tick that claimed it, from which its next poll counts (not
    from the answer: a task keeps its place in the ticks' rhythm however long the
    job waited).

    `seen` holds, per id, what the claim read of its registrations. The claim
    has already counted this poll and set each one's next poll time, so an
    answer that changes nothing (most of them) is not written at all: only the
    ids whose answer differs from what was seen are read and written. Without
    `seen` (a batch built by hand, or queued by an earlier version) every
    registration of the batch is read, and the answer counts the poll and sets
    the next one, counted from `claimed_at`.

    `probe`: the upstream had rejected the token when the batch was claimed; an
    answer clears that (`tracker.upstream.budget.clear_rejected`).
    """

    service: str
    task_ids: tuple[str, ...]
    lease_until: datetime | None = None
    claimed_at: datetime | None = None
    seen: Mapping[str, tuple[Seen, ...]] | None = None
    probe: bool = False


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


def poll_lease(settings: Settings, lookahead: float) -> float:
    """Seconds a claim leases its registrations: `TRACKER_POLL_LEASE`, and never past the
    tick that may claim them again (the poll interval, less the lookahead), since the claim
    has already set their next poll and an answer that changes nothing gives nothing back."""
    return min(settings.poll_lease, settings.poll_interval - lookahead)


def claim_due_tasks(
    session: Session, *, now: datetime, limit: int, settings: Settings, lookahead: float = 0.0
) -> list[Claim]:
    """Lease up to `limit` registrations due by `now` (plus `lookahead` s), count the poll
    each is about to get and set its next one (`next_poll_at`, counted from `now`).

    The poll's answer then writes only what it changes: a task keeps its place in the
    ticks' rhythm however long the job waits, and a poll whose job is lost happens again
    at the next poll time, as if the upstream had answered "no change".
    """
    lease_until = now + timedelta(seconds=poll_lease(settings, lookahead))
    horizon = now + timedelta(seconds=lookahead)
    rows: Iterable[Sequence[Any]]
    if is_postgresql(session):
        rows = session.connection().exec_driver_sql(
            _CLAIM_POSTGRESQL,
            {
                "now": now,
                "horizon": horizon,
                "limit": limit,
                "lease_until": lease_until,
                "poll_interval": settings.poll_interval,
                "max_poll_interval": settings.max_poll_interval,
                "share": BACKOFF_SHARE_OF_AGE,
            },
        )
    else:
        rows = _claim_sqlite(session, now, horizon, limit, lease_until, settings)
    # Most registrations look alike to a claim (running, same upstream word, no miss):
    # they share one `Seen`, which also keeps the poll jobs' messages short.
    views: dict[tuple[str, str | None, int], Seen] = {}
    # due_at is set on every row the claim matched (it was compared with now).
    claims = []
    for service, task_id, due_at, state, upstream_state, misses in rows:
        key = (state, upstream_state, misses)
        seen = views.get(key) or views.setdefault(key, Seen(*key))
        claims.append(Claim(service, task_id, due_at or now, lease_until, now, seen))
    return claims


# The claim in one statement: the due rows, locked, skipping those another claim holds;
# lease, poll counted, next poll as `next_poll_at` computes it (a test holds the two equal).
_CLAIM_POSTGRESQL = """
    UPDATE task_schedule
    SET claimed_until = %(lease_until)s,
        polls = task_schedule.polls + 1,
        next_poll_at = %(now)s + make_interval(secs => LEAST(
            %(max_poll_interval)s,
            GREATEST(
                %(poll_interval)s,
                EXTRACT(EPOCH FROM (%(now)s - tasks.created_at))::double precision * %(share)s
            )
        ))
    FROM (
        SELECT task_row_id, next_poll_at AS due_at FROM task_schedule
        WHERE next_poll_at <= %(horizon)s
          AND (claimed_until IS NULL OR claimed_until <= %(now)s)
        ORDER BY next_poll_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS due, tasks
    WHERE task_schedule.task_row_id = due.task_row_id AND tasks.id = due.task_row_id
    RETURNING tasks.service, tasks.task_id, due.due_at,
        tasks.state, tasks.upstream_state, task_schedule.misses
"""


def _claim_sqlite(
    session: Session,
    now: datetime,
    horizon: datetime,
    limit: int,
    lease_until: datetime,
    settings: Settings,
) -> list[tuple[str, str, datetime | None, str, str | None, int]]:
    """SQLite has no row locks: the lease is taken in one statement, whose write takes the
    database at once; then each row's poll is counted and its next one set."""
    due = (
        select(_SCHEDULE_TABLE.c.task_row_id)
        .where(
            _SCHEDULE_TABLE.c.next_poll_at <= horizon,
            or_(
                _SCHEDULE_TABLE.c.claimed_until.is_(None),
                _SCHEDULE_TABLE.c.claimed_until <= now,
            ),
        )
        .order_by(_SCHEDULE_TABLE.c.next_poll_at)
        .limit(limit)
    )
    connection = session.connection()
    leased = connection.execute(
        update(_SCHEDULE_TABLE)
        .where(_SCHEDULE_TABLE.c.task_row_id.in_(due.scalar_subquery()))
        .values(claimed_until=lease_until)
        .returning(
            _SCHEDULE_TABLE.c.task_row_id,
            _SCHEDULE_TABLE.c.next_poll_at,
            _SCHEDULE_TABLE.c.misses,
        )
    ).all()
    if not leased:
        return []
    ids = [row_id for row_id, _, _ in leased]
    tasks = {
        row.id: row
        for start in range(0, len(ids), _SQLITE_IDS_PER_STATEMENT)
        for row in connection.execute(
            _CLAIMED_SQLITE, {"ids": ids[start : start + _SQLITE_IDS_PER_STATEMENT]}
        )
    }
    connection.execute(
        _SCHEDULE,
        [
            {
                "row_id": row_id,
                "new_next_poll_at": next_poll_at(tasks[row_id].created_at, now, settings),
            }
            for row_id in ids
        ],
    )
    return [
        (
            tasks[row_id].service,
            tasks[row_id].task_id,
            due_at,
            tasks[row_id].state,
            tasks[row_id].upstream_state,
            misses,
        )
        for row_id, due_at, misses in leased
    ]


_SCHEDULE_TABLE = task_schedule_table
# Ids per statement: SQLite takes at most 32,766 parameters in one.
_SQLITE_IDS_PER_STATEMENT = 10_000
_CLAIMED_SQLITE = select(
    tasks_table.c.id,
    tasks_table.c.service,
    tasks_table.c.task_id,
    tasks_table.c.created_at,
    tasks_table.c.state,
    tasks_table.c.upstream_state,
).where(tasks_table.c.id.in_(bindparam("ids", expanding=True)))


def plan_batches(
    claimed: Iterable[Claim], batch_size: int, *, probe: bool = False
) -> list[PollBatch]:
    """Group claimed registrations by service, each upstream id once, `batch_size` per batch.

    `probe`: the token was rejected when they were claimed (see `PollBatch`).
    """
    groups: dict[tuple[str, datetime | None, datetime | None], dict[str, tuple[Seen, ...]]] = {}
    alone: dict[Seen, tuple[Seen]] = {}  # one tuple per distinct view, shared
    for claim in claimed:
        key = (claim.service, claim.lease_until, claim.claimed_at)
        ids = groups.get(key)
        if ids is None:
            ids = groups[key] = {}  # a dict keeps first-seen order, unlike a set
        seen = claim.seen
        views = () if seen is None else alone.get(seen) or alone.setdefault(seen, (seen,))
        earlier = ids.get(claim.task_id)
        ids[claim.task_id] = views if earlier is None else earlier + views
    batches = []
    for (service, lease_until, claimed_at), ids in groups.items():
        distinct = list(ids)
        for start in range(0, len(distinct), batch_size):
            chunk = tuple(distinct[start : start + batch_size])
            chunk_seen = {task_id: ids[task_id] for task_id in chunk}
            batch_seen = chunk_seen if all(chunk_seen.values()) else None
            batches.append(PollBatch(service, chunk, lease_until, claimed_at, batch_seen, probe))
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
    next_poll_at: datetime | None
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
    Task.next_poll_at,
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
    """Apply one `retrieve_batch` answer to the active registrations of the batch's ids.

    With what the claim saw (`PollBatch.seen`), an id whose answer matches it is
    not read or written: the claim counted the poll and set the next one. The
    other ids' registrations are read as plain columns, locked; those the answer
    leaves unchanged (a miss counted, a miss count reset) are written by one
    set-based UPDATE, and only one whose state or upstream word changes is loaded
    as a `Task` for `record_transition`. Registrations another worker has leased
    since are left to that worker.
    """
    applied = BatchApplied()
    counted = batch.seen is not None  # the claim counted this poll and set the next one
    scheduled_from = batch.claimed_at or now
    task_ids: Sequence[str] = batch.task_ids
    if batch.seen is not None:
        task_ids = []
        for task_id in batch.task_ids:
            seen = batch.seen.get(task_id, ())
            if _answer_changes(seen, records.get(task_id)):
                task_ids.append(task_id)
            else:
                applied.observed += len(seen)
        if not task_ids:
            return applied

    def rescheduled(row: _Polled, *, polled: bool, misses: int) -> _Rescheduled:
        if counted and row.next_poll_at is not None:
            return _Rescheduled(row.id, row.polls, misses, row.next_poll_at)
        polls = row.polls + 1 if polled and not counted else row.polls
        return _Rescheduled(
            row.id, polls, misses, next_poll_at(row.created_at, scheduled_from, settings)
        )

    unchanged: list[_Rescheduled] = []
    changed: dict[int, tuple[dict[str, Any], Observation]] = {}
    for row in _lock_active_registrations(session, batch.service, task_ids):
        if _leased_by_another(row, batch.lease_until, now):
            continue
        applied.observed += 1
        record = records.get(row.task_id)
        if record is None:
            misses = row.misses + 1
            if misses >= settings.not_found_after and row.task_id not in applied.missing:
                applied.missing.append(row.task_id)
            unchanged.append(rescheduled(row, polled=False, misses=misses))
            continue
        observation = normalise(record)
        if _changes(row.state, row.upstream_state, observation):
            changed[row.id] = (record, observation)
        else:
            unchanged.append(rescheduled(row, polled=True, misses=0))
    if changed:
        _apply_changes(
            session,
            changed,
            applied,
            now=now,
            scheduled_from=None if counted else scheduled_from,
            settings=settings,
        )
    if unchanged:
        _reschedule(session, unchanged)
    return applied


def _changes(state: str, upstream_state: str | None, observation: Observation) -> bool:
    """The observation moves the registration to a new state or brings a new upstream word."""
    return (
        observation.state is not None and can_transition(state, observation.state)
    ) or observation.upstream_state not in (None, upstream_state)


def _answer_changes(seen: Sequence[Seen], record: dict[str, Any] | None) -> bool:
    """An id's answer must be written: it is missing (a miss to count), or it changes a
    registration the claim saw, or ends a run of misses."""
    if record is None or not seen:
        return True
    observation = normalise(record)
    return any(
        seen_one.misses or _changes(seen_one.state, seen_one.upstream_state, observation)
        for seen_one in seen
    )


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
    scheduled_from: datetime | None,
    settings: Settings,
) -> None:
    """New states (history and outbox through `record_transition`) and new upstream words.

    `scheduled_from`: the tick the next poll counts from, and the poll is counted here;
    None if the claim did both.
    """
    # populate_existing: objects already in the session take the values just read under lock.
    tasks = session.scalars(
        select(Task)
        .where(Task.id.in_(changed))
        .order_by(Task.id)
        .execution_options(populate_existing=True)
    )
    for task in tasks:
        record, observation = changed[task.id]
        if scheduled_from is not None:
            task.polls += 1
            task.next_poll_at = next_poll_at(task.created_at, scheduled_from, settings)
        task.misses = 0
        task.claimed_until = None
        if observation.state is not None and can_transition(task.state, observation.state):
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
        else:
            # A new upstream word, same state (queued -> pending): keep it, no history row.
            task.upstream_state, task.record, task.updated_at = (
                observation.upstream_state,
                record,
                now,
            )


# One statement for every registration of a batch the answer did not change. The
# arrays go in psycopg's binary format (`%(...)b`): dumping 50 timestamps as text
# costs more CPU than the rest of the statement.
_RESCHEDULE_POSTGRESQL = """
    UPDATE task_schedule
    SET polls = v.polls, misses = v.misses, next_poll_at = v.next_poll_at, claimed_until = NULL
    FROM unnest(
        CAST(%(ids)b AS bigint[]), CAST(%(polls)b AS integer[]), CAST(%(misses)b AS integer[]),
        CAST(%(next_poll_at)b AS timestamptz[])
    ) AS v(id, polls, misses, next_poll_at)
    WHERE task_schedule.task_row_id = v.id
"""
_RESCHEDULE = (
    update(_SCHEDULE_TABLE)
    .where(_SCHEDULE_TABLE.c.task_row_id == bindparam("row_id"))
    .values(
        polls=bindparam("new_polls"),
        misses=bindparam("new_misses"),
        next_poll_at=bindparam("new_next_poll_at"),
        claimed_until=None,
    )
)


# SQLite's second step of a claim: the poll counted, the next poll time of each row.
_SCHEDULE = (
    update(_SCHEDULE_TABLE)
    .where(_SCHEDULE_TABLE.c.task_row_id == bindparam("row_id"))
    .values(polls=_SCHEDULE_TABLE.c.polls + 1, next_poll_at=bindparam("new_next_poll_at"))
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
    """Give a batch's leases back, to be polled again at `retry_at` (upstream trouble);
    the poll its claim counted did not happen."""
    schedule = _SCHEDULE_TABLE.c
    mine = (
        or_(schedule.claimed_until.is_(None), schedule.claimed_until == batch.lease_until)
        if batch.lease_until is not None
        else true()
    )
    values: dict[Any, Any] = {schedule.claimed_until: None, schedule.next_poll_at: retry_at}
    if batch.seen is not None:
        values[schedule.polls] = case(
            (schedule.claimed_until == batch.lease_until, schedule.polls - 1),
            else_=schedule.polls,
        )
    active = select(tasks_table.c.id).where(
        tasks_table.c.service == batch.service,
        tasks_table.c.task_id.in_(batch.task_ids),
        tasks_table.c.state.in_(ACTIVE_STATES),
    )
    session.execute(
        update(_SCHEDULE_TABLE)
        .where(schedule.task_row_id.in_(active.scalar_subquery()), mine)
        .values(values)
    )


def renew_lease(
    session: Session, batch: PollBatch, *, now: datetime, settings: Settings
) -> PollBatch:
    """The batch, reduced to the ids whose registrations still carry its lease, leased again.

    A job can reach its batch after the lease ended (it waited behind others, or for
    the upstream budget). Registrations no tick has claimed since are still its own:
    one conditional UPDATE takes them again, and they are polled now rather than given
    back for a later tick. Those claimed since belong to that tick's job, which polls them.
    """
    lease_until = now + timedelta(seconds=poll_lease(settings, claim_lookahead(settings)))
    registrations = select(tasks_table.c.id).where(
        tasks_table.c.service == batch.service, tasks_table.c.task_id.in_(batch.task_ids)
    )
    renewed = session.scalars(
        update(_SCHEDULE_TABLE)
        .where(
            _SCHEDULE_TABLE.c.task_row_id.in_(registrations.scalar_subquery()),
            _SCHEDULE_TABLE.c.claimed_until == batch.lease_until,
        )
        .values(claimed_until=lease_until)
        .returning(_SCHEDULE_TABLE.c.task_row_id)
    ).all()
    still_mine = (
        set(session.scalars(select(tasks_table.c.task_id).where(tasks_table.c.id.in_(renewed))))
        if renewed
        else set()
    )
    task_ids = tuple(task_id for task_id in batch.task_ids if task_id in still_mine)
    if len(task_ids) < len(batch.task_ids):
        log.warning(
            "the lease of %d %s ids ran out before their poll and a later tick took them",
            len(batch.task_ids) - len(task_ids),
            batch.service,
        )
    seen = None if batch.seen is None else {i: batch.seen[i] for i in task_ids}
    return replace(batch, task_ids=task_ids, lease_until=lease_until, seen=seen)


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
        with sessions.begin() as session:
            batch = renew_lease(session, batch, now=now(), settings=settings)
        if not batch.task_ids:
            outcome.error = "lease_expired"
            return outcome
    try:
        records = upstream.retrieve_batch(batch.service, batch.task_ids)
    except (BudgetUnavailable, UpstreamError) as exc:
        outcome.error = _handle_upstream_trouble(
            sessions, budget, batch, exc, settings, credential, now()
        )
        return outcome

    # A session opens no connection until its first statement: an answer that changes
    # nothing the claim saw costs the database nothing.
    with sessions.begin() as session:
        if (batch.probe or batch.seen is None) and clear_rejected(session, credential):
            log.warning("upstream accepts the token again; polling resumes")
        outcome.applied = apply_batch_answer(session, batch, records, now=now(), settings=settings)
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
