"""Retention: pruning the history of tasks terminal for longer than TRACKER_RETENTION_DAYS.

Opt-in (the history is the product): nothing is deleted unless TRACKER_RETENTION_DAYS is
set, or `tracker prune` is run. A task goes with its schedule row, transitions,
deliveries and their attempts; a task with a delivery still pending is kept until it
settles. Operational events (no task) older than the cut-off go too, once settled.
Rows go in batches of `PRUNE_BATCH` tasks, each its own short transaction, so no lock
is held for long and registrations and polls (which touch active tasks) go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Delete, Engine, Select, Table, delete, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from tracker.db.engine import transaction
from tracker.db.models import (
    TaskTransition,
    WebhookAttempt,
    WebhookDelivery,
    task_schedule_table,
    tasks_table,
)
from tracker.states import DELIVERY_PENDING

PRUNE_BATCH = 1000

_TRANSITIONS = cast(Table, TaskTransition.__table__)


@dataclass
class Pruned:
    """What a prune removed (or, in a dry run, would remove)."""

    tasks: int = 0
    transitions: int = 0
    deliveries: int = 0
    attempts: int = 0
    operational_events: int = 0

    def add(self, other: Pruned) -> None:
        for name in (f.name for f in fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def _prunable_tasks(cutoff: datetime) -> Select[Any]:
    pending = exists().where(
        WebhookDelivery.task_row_id == tasks_table.c.id,
        WebhookDelivery.status == DELIVERY_PENDING,
    )
    return select(tasks_table.c.id).where(
        tasks_table.c.finished_at.is_not(None), tasks_table.c.finished_at < cutoff, ~pending
    )


def _prunable_events(cutoff: datetime) -> Select[Any]:
    return select(WebhookDelivery.id).where(
        WebhookDelivery.task_row_id.is_(None),
        WebhookDelivery.status != DELIVERY_PENDING,
        WebhookDelivery.created_at < cutoff,
    )


def count_prunable(session: Session, *, cutoff: datetime) -> Pruned:
    """What pruning at `cutoff` would remove (`tracker prune --dry-run`)."""
    tasks = _prunable_tasks(cutoff).subquery()
    events = _prunable_events(cutoff).subquery()
    deliveries = select(WebhookDelivery.id).where(WebhookDelivery.task_row_id.in_(select(tasks)))

    def count(query: Select[Any]) -> int:
        return int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)

    return Pruned(
        tasks=count(select(tasks)),
        transitions=count(
            select(_TRANSITIONS.c.id).where(_TRANSITIONS.c.task_row_id.in_(select(tasks)))
        ),
        deliveries=count(deliveries),
        attempts=count(
            select(WebhookAttempt.id).where(
                WebhookAttempt.delivery_id.in_(deliveries.union(select(events)))
            )
        ),
        operational_events=count(select(events)),
    )


def prune_batch(session: Session, *, cutoff: datetime, limit: int = PRUNE_BATCH) -> Pruned:
    """Remove up to `limit` prunable tasks with their history, and up to `limit` settled
    operational events, older than `cutoff`. Children first, so it needs no cascade."""
    task_ids: list[int] = list(
        session.scalars(_prunable_tasks(cutoff).order_by(tasks_table.c.finished_at).limit(limit))
    )
    event_ids: list[str] = list(session.scalars(_prunable_events(cutoff).limit(limit)))
    pruned = Pruned()
    if task_ids:
        delivery_ids = list(
            session.scalars(
                select(WebhookDelivery.id).where(WebhookDelivery.task_row_id.in_(task_ids))
            )
        )
        pruned.deliveries = len(delivery_ids)
        pruned.attempts = _delete_attempts(session, delivery_ids)
        _execute_delete(
            session, delete(WebhookDelivery).where(WebhookDelivery.id.in_(delivery_ids))
        )
        pruned.transitions = _execute_delete(
            session, delete(_TRANSITIONS).where(_TRANSITIONS.c.task_row_id.in_(task_ids))
        )
        _execute_delete(
            session,
            delete(task_schedule_table).where(task_schedule_table.c.task_row_id.in_(task_ids)),
        )
        pruned.tasks = _execute_delete(
            session, delete(tasks_table).where(tasks_table.c.id.in_(task_ids))
        )
    if event_ids:
        pruned.attempts += _delete_attempts(session, event_ids)
        pruned.operational_events = _execute_delete(
            session, delete(WebhookDelivery).where(WebhookDelivery.id.in_(event_ids))
        )
    return pruned


def _delete_attempts(session: Session, delivery_ids: list[str]) -> int:
    if not delivery_ids:
        return 0
    return _execute_delete(
        session, delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(delivery_ids))
    )


def _execute_delete(session: Session, statement: Delete) -> int:
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(getattr(result, "rowcount", 0) or 0)


def prune_history(
    sessions: Engine | sessionmaker[Session],
    *,
    older_than: timedelta,
    now: datetime,
    batch: int = PRUNE_BATCH,
    dry_run: bool = False,
    progress: Callable[[Pruned], None] | None = None,
) -> Pruned:
    """Prune everything terminal for longer than `older_than`, a batch per transaction,
    until nothing is left; `dry_run` only counts. `progress` sees each batch."""
    cutoff = now - older_than
    if dry_run:
        with transaction(sessions) as session:
            return count_prunable(session, cutoff=cutoff)
    total = Pruned()
    while True:
        with transaction(sessions) as session:
            pruned = prune_batch(session, cutoff=cutoff, limit=batch)
        total.add(pruned)
        if progress is not None:
            progress(pruned)
        if pruned.tasks < batch and pruned.operational_events < batch:
            return total
