"""Registering and cancelling tracked tasks. Functions take a session and do not commit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session, make_transient_to_detached

from tracker.clock import utcnow
from tracker.config import Settings, get_settings
from tracker.db.engine import dialect_insert
from tracker.db.models import Client, Task, TaskTransition, task_schedule_table, tasks_table
from tracker.errors import RegistrationConflict, TaskNotFound
from tracker.states import ACTIVE_STATES, CANCELLED, PENDING
from tracker.tracking.schemas import TaskRegistration
from tracker.tracking.transitions import record_transition

_TRANSITIONS = cast(Table, TaskTransition.__table__)


@dataclass(frozen=True)
class Registered:
    task: Task
    created: bool  # False: the same registration existed already (idempotent repeat)


def find_task(session: Session, client: Client, task_id: str, service: str) -> Task | None:
    return session.scalar(
        select(Task).where(
            Task.client_id == client.id, Task.service == service, Task.task_id == task_id
        )
    )


def _same_settings(task: Task, wanted: TaskRegistration, timeout: int) -> bool:
    return (
        task.callback_url == wanted.callback_url
        and task.metadata_ == wanted.metadata
        and sorted(task.events) == sorted(wanted.events)
        and task.timeout_seconds == timeout
    )


def with_client_defaults(registration: TaskRegistration, client: Client) -> TaskRegistration:
    """The registration with the client's `default_callback_url` / `default_events` where it
    leaves `callback_url` / `events` out (an explicit value, null included, is kept)."""
    given = registration.model_fields_set
    changes: dict[str, Any] = {}
    if "callback_url" not in given and client.default_callback_url is not None:
        changes["callback_url"] = client.default_callback_url
    if "events" not in given and client.default_events is not None:
        changes["events"] = sorted(set(client.default_events))
    return registration.model_copy(update=changes) if changes else registration


def register_task(
    session: Session,
    client: Client,
    registration: TaskRegistration,
    *,
    now: datetime | None = None,
    settings: Settings | None = None,
    doorbell_hash: str | None = None,
) -> Registered:
    """Start tracking a task for `client`; repeating the same registration is harmless.

    Inserted first, `ON CONFLICT DO NOTHING`: three statements for a new task
    (docs/decisions/0011-registration-insert-first.md). A registration racing another
    for the same task waits for it and then answers as a repeat or a conflict, without
    breaking the caller's transaction (a batch goes on with its other items).

    `doorbell_hash`: the hash of the doorbell token a submission gave the upstream as
    its callback URL (`tracker.polling.doorbell`).
    """
    settings = settings or get_settings()
    now = now or utcnow()
    registration = with_client_defaults(registration, client)
    timeout = registration.timeout_seconds or settings.task_timeout
    values = {
        "client_id": client.id,
        "task_id": registration.task_id,
        "service": registration.service,
        "state": PENDING,
        "callback_url": registration.callback_url,
        "events": list(registration.events),
        "timeout_seconds": timeout,
        "created_at": now,
        "updated_at": now,
        "deadline_at": now + timedelta(seconds=timeout),
        "doorbell_hash": doorbell_hash,
    }
    # Due at once: a task already finished upstream is seen at the next tick.
    schedule: dict[str, Any] = {"polls": 0, "misses": 0, "next_poll_at": now}
    session.flush()  # what Session.execute would do before a statement of the ORM
    connection = session.connection()
    row_id = connection.execute(
        dialect_insert(session)(tasks_table)
        .values({**values, "metadata": registration.metadata})
        .on_conflict_do_nothing(index_elements=["service", "task_id", "client_id"])
        .returning(tasks_table.c.id)
    ).scalar()
    if row_id is None:
        return _registered_before(session, client, registration, timeout)
    connection.execute(insert(task_schedule_table).values(task_row_id=row_id, **schedule))
    connection.execute(
        insert(_TRANSITIONS).values(
            task_row_id=row_id, from_state=None, to_state=PENDING, observed_at=now
        )
    )
    # The row as written, in the session without reading it back.
    task = Task(
        id=row_id,
        upstream_state=None,
        finished_at=None,
        failure_code=None,
        failure_message=None,
        record=None,
        claimed_until=None,
        metadata_=registration.metadata,
        **values,
        **schedule,
    )
    make_transient_to_detached(task)
    session.add(task)
    return Registered(task, created=True)


def _registered_before(
    session: Session, client: Client, registration: TaskRegistration, timeout: int
) -> Registered:
    """The answer to a registration of a task the client has registered already."""
    existing = find_task(session, client, registration.task_id, registration.service)
    if existing is None:  # the insert met this row, and registrations are never deleted
        raise RuntimeError(f"task {registration.task_id!r} conflicted but cannot be found")
    if _same_settings(existing, registration, timeout):
        return Registered(existing, created=False)
    if existing.state in ACTIVE_STATES:
        raise RegistrationConflict(
            f"task {registration.task_id!r} of service {registration.service!r} is already "
            "tracked with other settings (callback_url, metadata, events or timeout_seconds); "
            "send the same settings, or DELETE it first"
        )
    raise RegistrationConflict(
        f"task {registration.task_id!r} of service {registration.service!r} was tracked "
        f"already and ended {existing.state!r}; its history is kept under that registration"
    )


def cancel_task(
    session: Session, client: Client, task_id: str, service: str, *, now: datetime | None = None
) -> Task:
    """Stop tracking: the task becomes `cancelled`; history stays, no further webhooks."""
    task = find_task(session, client, task_id, service)
    if task is None:
        raise TaskNotFound(f"no task {task_id!r} of service {service!r} is tracked for this client")
    if task.state in ACTIVE_STATES:
        # A terminal transition supersedes the pending `task.running` webhook, if any.
        record_transition(session, task, CANCELLED, observed_at=now or utcnow())
    return task
