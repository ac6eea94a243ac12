"""Applying an upstream answer to the registrations of a batch, in the caller's transaction."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    String,
    any_,
    bindparam,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from tracker.config import Settings
from tracker.db.engine import is_postgresql
from tracker.db.models import Task, task_schedule_table
from tracker.polling.batches import BatchApplied, PollBatch, Seen
from tracker.polling.schedule import next_poll_at
from tracker.profiles import Profile, profile_for
from tracker.states import ACTIVE_STATES, FAILED, TIMED_OUT, can_transition
from tracker.tracking.normalise import Failure, Observation, normalise_with
from tracker.tracking.transitions import record_transition
from tracker.upstream.budget import credential_key, rejected_credentials
from tracker.upstream.credentials import client_credentials

log = logging.getLogger("tracker.polling")


class _Polled(NamedTuple):
    """The columns of a registration that a poll answer is compared with."""

    id: int
    task_id: str
    state: str
    upstream_state: str | None
    progress: int | None
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
    Task.progress,
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
    return [_Polled._make(row) for row in rows]


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
    profile = profile_for(batch.service)
    if batch.seen is not None:
        task_ids = []
        for task_id in batch.task_ids:
            seen = batch.seen.get(task_id, ())
            if _answer_changes(seen, records.get(task_id), profile):
                task_ids.append(task_id)
            else:
                applied.observed += len(seen)
        if not task_ids:
            return applied

    def rescheduled(row: _Polled, *, polled: bool, misses: int) -> _Rescheduled:
        if counted and row.next_poll_at is not None:
            return _Rescheduled(row.id, row.polls, misses, row.next_poll_at)
        polls = row.polls + 1 if polled and not counted else row.polls
        next_at = next_poll_at(row.created_at, scheduled_from, settings, service=batch.service)
        return _Rescheduled(row.id, polls, misses, next_at)

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
        observation = normalise_with(record, profile)
        if _changes(row.state, row.upstream_state, row.progress, observation):
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


def _changes(
    state: str, upstream_state: str | None, progress: int | None, observation: Observation
) -> bool:
    """The observation moves the registration to a new state, or brings a new upstream word
    or a new progress."""
    return (
        (observation.state is not None and can_transition(state, observation.state))
        or observation.upstream_state not in (None, upstream_state)
        or observation.progress not in (None, progress)
    )


def _answer_changes(seen: Sequence[Seen], record: dict[str, Any] | None, profile: Profile) -> bool:
    """An id's answer must be written: it is missing (a miss to count), or it changes a
    registration the claim saw, or ends a run of misses."""
    if record is None or not seen:
        return True
    observation = normalise_with(record, profile)
    return any(
        seen_one.misses
        or _changes(seen_one.state, seen_one.upstream_state, seen_one.progress, observation)
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
            task.next_poll_at = next_poll_at(
                task.created_at, scheduled_from, settings, service=task.service
            )
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
                    progress=observation.progress,
                )
            ]
            applied.transitions += 1
        else:
            # A new upstream word or progress, same state (queued -> pending, 40 % -> 60 %):
            # keep it, no history row.
            if observation.upstream_state is not None:
                task.upstream_state = observation.upstream_state
            if observation.progress is not None:
                task.progress = observation.progress
            task.record, task.updated_at = record, now


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
    update(task_schedule_table)
    .where(task_schedule_table.c.task_row_id == bindparam("row_id"))
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


def time_out_overdue_tasks(
    session: Session, *, now: datetime, limit: int = 500, settings: Settings | None = None
) -> list[str]:
    """Tasks past their deadline become `timed_out`; returns the new delivery ids.

    A task whose client's token the upstream rejects (with `settings`: also the
    tracker's own) could not be polled: its failure says so (`upstream_token_rejected`),
    so that client sees why, and other clients' tasks are unaffected.
    """
    query = (
        select(Task)
        .where(Task.deadline_at <= now, Task.state.in_(ACTIVE_STATES))
        .order_by(Task.deadline_at)
        .limit(limit)
    )
    if is_postgresql(session):
        query = query.with_for_update(skip_locked=True)
    overdue = list(session.scalars(query))
    if not overdue:
        return []
    rejected = rejected_credentials(session)
    own_tokens = client_credentials(session) if rejected else {}
    tracker_token = credential_key(settings.upstream_bearer) if settings is not None else None
    delivery_ids: list[str] = []
    for task in overdue:
        token = own_tokens.get(task.client_id, tracker_token)
        rejected_at = rejected.get(token) if token is not None else None
        if rejected_at is not None:
            failure = Failure(
                "upstream_token_rejected",
                f"no terminal state within {task.timeout_seconds} s of registration: the "
                f"upstream has rejected the token this task is polled with since "
                f"{rejected_at.isoformat()}, so it could not be polled; set a valid one "
                "(`tracker clients set-upstream-token`, or TRACKER_UPSTREAM_TOKEN)",
            )
        else:
            failure = Failure(
                "timed_out", f"no terminal state within {task.timeout_seconds} s of registration"
            )
        delivery_ids += [
            d.id
            for d in record_transition(session, task, TIMED_OUT, observed_at=now, failure=failure)
        ]
    return delivery_ids
