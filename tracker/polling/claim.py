"""Claiming due registrations with a lease, and giving leases back or renewing them."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    bindparam,
    case,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session

from tracker.config import SERVICE_NAME, Settings
from tracker.db.engine import is_postgresql
from tracker.db.models import task_schedule_table, tasks_table
from tracker.polling.batches import ClaimedTask, PollBatch, Seen
from tracker.polling.schedule import (
    BACKOFF_SHARE_OF_AGE,
    claim_lookahead,
    next_poll_at,
    poll_lease,
    service_paces,
)
from tracker.states import (
    ACTIVE_STATES,
)
from tracker.upstream.budget import credential_key
from tracker.upstream.credentials import client_credentials

log = logging.getLogger("tracker.polling")


def claim_due_tasks(
    session: Session,
    *,
    now: datetime,
    limit: int,
    settings: Settings,
    lookahead: float = 0.0,
    row_ids: Sequence[int] | None = None,
) -> list[ClaimedTask]:
    """Lease up to `limit` registrations due by `now` (plus `lookahead` s), count the poll
    each is about to get and set its next one (`next_poll_at`, counted from `now`). Each
    claim names the token its client polls with (`ClaimedTask.credential`). With `row_ids`,
    only those registrations are claimed, if due (the ones a doorbell made due).

    The poll's answer then writes only what it changes: a task keeps its place in the
    ticks' rhythm however long the job waits, and a poll whose job is lost happens again
    at the next poll time, as if the upstream had answered "no change"
    (docs/decisions/0001-write-nothing-polling.md).
    """
    lease_until = now + timedelta(seconds=poll_lease(settings, lookahead))
    horizon = now + timedelta(seconds=lookahead)
    rows: Iterable[Sequence[Any]]
    if is_postgresql(session):
        parameters: dict[str, Any] = {
            "now": now,
            "horizon": horizon,
            "limit": limit,
            "lease_until": lease_until,
            "poll_interval": settings.poll_interval,
            "max_poll_interval": settings.max_poll_interval,
            "share": BACKOFF_SHARE_OF_AGE,
        }
        if row_ids is not None:
            parameters["row_ids"] = list(row_ids)
        rows = session.connection().exec_driver_sql(
            _claim_postgresql(tuple(service_paces(settings).items()), rows=row_ids is not None),
            parameters,
        )
    else:
        rows = _claim_sqlite(session, now, horizon, limit, lease_until, settings, row_ids)
    # Most registrations look alike to a claim (running, same upstream word, no miss):
    # they share one `Seen`, which also keeps the poll jobs' messages short.
    views: dict[tuple[str, str | None, int, int | None], Seen] = {}
    # Which token each registration is polled with: its client's own, or the tracker's.
    own_tokens: dict[int, str] | None = None
    tracker_token = credential_key(settings.upstream_bearer)
    # due_at is set on every row the claim matched (it was compared with now).
    claims = []
    for service, task_id, due_at, state, upstream_state, misses, progress, client_id in rows:
        key = (state, upstream_state, misses, progress)
        seen = views.get(key) or views.setdefault(key, Seen(*key))
        if own_tokens is None:
            own_tokens = client_credentials(session)
        credential = own_tokens.get(client_id, tracker_token)
        claims.append(
            ClaimedTask(service, task_id, due_at or now, lease_until, now, seen, credential)
        )
    return claims


# The claim in one statement (docs/decisions/0002-task-schedule-table.md); a test holds its
# next poll equal to `next_poll_at`. A service with a pace of its own polls fresh tasks at
# that pace: its name and seconds are written into the statement (names are checked
# `[a-z0-9-]`), so the text is the same for every claim and psycopg prepares it once.
@lru_cache(maxsize=16)
def _claim_postgresql(paces: tuple[tuple[str, float], ...], *, rows: bool) -> str:
    """The claim's statement for these paces; with `rows`, for given registrations only."""
    fresh = "%(poll_interval)s"
    if paces:
        cases = " ".join(
            f"WHEN '{_service_literal(service)}' THEN {float(pace)!r}" for service, pace in paces
        )
        fresh = f"CASE tasks.service {cases} ELSE %(poll_interval)s END"
    statement = _CLAIM_ROWS_POSTGRESQL if rows else _CLAIM_POSTGRESQL
    return statement.replace("%(fresh_interval)s", fresh)


def _service_literal(service: str) -> str:
    if not SERVICE_NAME.fullmatch(service):
        raise ValueError(f"a service is 1-32 of a-z, 0-9 and - (got {service!r})")
    return service


_CLAIM_POSTGRESQL = """
    UPDATE task_schedule
    SET claimed_until = %(lease_until)s,
        polls = task_schedule.polls + 1,
        next_poll_at = %(now)s + make_interval(secs => LEAST(
            %(max_poll_interval)s,
            GREATEST(
                %(fresh_interval)s,
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
        tasks.state, tasks.upstream_state, task_schedule.misses, tasks.progress, tasks.client_id
"""
# The same, for given registrations only.
_CLAIM_ROWS_POSTGRESQL = _CLAIM_POSTGRESQL.replace(
    "AND (claimed_until IS NULL OR claimed_until <= %(now)s)",
    "AND (claimed_until IS NULL OR claimed_until <= %(now)s)\n"
    "          AND task_row_id = ANY(%(row_ids)s)",
)


def _claim_sqlite(
    session: Session,
    now: datetime,
    horizon: datetime,
    limit: int,
    lease_until: datetime,
    settings: Settings,
    row_ids: Sequence[int] | None,
) -> list[tuple[str, str, datetime | None, str, str | None, int, int | None, int]]:
    """SQLite has no row locks: the lease is taken in one statement, whose write takes the
    database at once; then each row's poll is counted and its next one set."""
    due = (
        select(task_schedule_table.c.task_row_id)
        .where(
            task_schedule_table.c.next_poll_at <= horizon,
            or_(
                task_schedule_table.c.claimed_until.is_(None),
                task_schedule_table.c.claimed_until <= now,
            ),
        )
        .order_by(task_schedule_table.c.next_poll_at)
        .limit(limit)
    )
    if row_ids is not None:
        due = due.where(task_schedule_table.c.task_row_id.in_(list(row_ids)))
    connection = session.connection()
    leased = connection.execute(
        update(task_schedule_table)
        .where(task_schedule_table.c.task_row_id.in_(due.scalar_subquery()))
        .values(claimed_until=lease_until)
        .returning(
            task_schedule_table.c.task_row_id,
            task_schedule_table.c.next_poll_at,
            task_schedule_table.c.misses,
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
                "new_next_poll_at": next_poll_at(
                    tasks[row_id].created_at, now, settings, service=tasks[row_id].service
                ),
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
            tasks[row_id].progress,
            tasks[row_id].client_id,
        )
        for row_id, due_at, misses in leased
    ]


# Ids per statement: SQLite takes at most 32,766 parameters in one.
_SQLITE_IDS_PER_STATEMENT = 10_000
_CLAIMED_SQLITE = select(
    tasks_table.c.id,
    tasks_table.c.service,
    tasks_table.c.task_id,
    tasks_table.c.created_at,
    tasks_table.c.state,
    tasks_table.c.upstream_state,
    tasks_table.c.progress,
    tasks_table.c.client_id,
).where(tasks_table.c.id.in_(bindparam("ids", expanding=True)))


# SQLite's second step of a claim: the poll counted, the next poll time of each row.
_SCHEDULE = (
    update(task_schedule_table)
    .where(task_schedule_table.c.task_row_id == bindparam("row_id"))
    .values(polls=task_schedule_table.c.polls + 1, next_poll_at=bindparam("new_next_poll_at"))
)


def release_batch(session: Session, batch: PollBatch, *, retry_at: datetime) -> None:
    """Give a batch's leases back, to be polled again at `retry_at` (upstream trouble);
    the poll its claim counted did not happen."""
    schedule = task_schedule_table.c
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
        update(task_schedule_table)
        .where(schedule.task_row_id.in_(active.scalar_subquery()), mine)
        .values(values)
    )


def renew_lease(
    session: Session, batch: PollBatch, *, now: datetime, settings: Settings
) -> PollBatch:
    """The batch's ids still carrying its lease, leased again; others belong to a later tick
    (docs/decisions/0005-poll-backpressure-and-expiring-jobs.md)."""
    lease_until = now + timedelta(seconds=poll_lease(settings, claim_lookahead(settings)))
    registrations = select(tasks_table.c.id).where(
        tasks_table.c.service == batch.service, tasks_table.c.task_id.in_(batch.task_ids)
    )
    renewed = session.scalars(
        update(task_schedule_table)
        .where(
            task_schedule_table.c.task_row_id.in_(registrations.scalar_subquery()),
            task_schedule_table.c.claimed_until == batch.lease_until,
        )
        .values(claimed_until=lease_until)
        .returning(task_schedule_table.c.task_row_id)
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
