"""Registering and cancelling tracked tasks. Functions take a session and do not commit."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tracker.config import Settings, get_settings
from tracker.errors import RegistrationConflict, TaskNotFound
from tracker.history import record_transition
from tracker.models import Client, Task, TaskTransition
from tracker.schemas import TaskRegistration
from tracker.states import ACTIVE_STATES, CANCELLED, PENDING
from tracker.timeutil import utcnow


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


def register_task(
    session: Session,
    client: Client,
    registration: TaskRegistration,
    *,
    now: datetime | None = None,
    settings: Settings | None = None,
) -> Registered:
    """Start tracking a task for `client`; repeating the same registration is harmless."""
    settings = settings or get_settings()
    now = now or utcnow()
    timeout = registration.timeout_seconds or settings.task_timeout
    existing = find_task(session, client, registration.task_id, registration.service)
    if existing is not None:
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
    task = Task(
        client_id=client.id,
        task_id=registration.task_id,
        service=registration.service,
        state=PENDING,
        callback_url=registration.callback_url,
        metadata_=registration.metadata,
        events=list(registration.events),
        timeout_seconds=timeout,
        created_at=now,
        updated_at=now,
        deadline_at=now + timedelta(seconds=timeout),
        polls=0,
        misses=0,
        next_poll_at=now,  # due at once: a task already finished upstream is seen on the next tick
    )
    session.add(task)
    session.add(TaskTransition(task=task, from_state=None, to_state=PENDING, observed_at=now))
    session.flush()
    return Registered(task, created=True)


def register_task_safely(
    session: Session,
    client: Client,
    registration: TaskRegistration,
    *,
    now: datetime | None = None,
    settings: Settings | None = None,
) -> Registered:
    """`register_task` in a savepoint, safe against a concurrent registration of the same task.

    Two requests racing to register one task both pass the lookup; the loser's
    insert breaks the unique constraint. Its savepoint is rolled back and the
    lookup repeated, so it answers as an idempotent repeat or a conflict. A
    failed item never spoils the rest of the caller's transaction (batches).
    """
    try:
        with session.begin_nested():
            return register_task(session, client, registration, now=now, settings=settings)
    except IntegrityError:
        with session.begin_nested():
            return register_task(session, client, registration, now=now, settings=settings)


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
