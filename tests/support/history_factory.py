"""Rows of history for the read-side tests: tasks in any state, deliveries with attempts."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from tracker.db.models import Client, Task, WebhookAttempt, WebhookDelivery
from tracker.states import (
    COMPLETED,
    DELIVERY_FAILED,
    DELIVERY_PENDING,
    DELIVERY_SUCCEEDED,
    FAILED,
    RUNNING,
)
from tracker.tracking.normalise import Failure
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration, destination_of
from tracker.tracking.transitions import new_delivery_id, record_transition, webhook_payload

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def add_task(
    session: Session,
    client: Client,
    task_id: str,
    *,
    created_at: datetime = T0,
    service: str = "luma",
    state: str = "pending",
    callback_url: str | None = "https://hooks.example.com/tracker",
    events: Sequence[str] | None = None,
) -> Task:
    """A registration at `created_at`, moved through `running` to `state` a minute apart."""
    registration = TaskRegistration(
        task_id=task_id,
        service=service,
        callback_url=callback_url,
        **({"events": list(events)} if events is not None else {}),
    )
    task = register_task(session, client, registration, now=created_at).task
    later = created_at
    if state != "pending":
        if state in (RUNNING, COMPLETED, FAILED):
            later += timedelta(minutes=1)
            record_transition(
                session, task, RUNNING, observed_at=later, upstream_state="processing"
            )
        if state != RUNNING:
            later += timedelta(minutes=1)
            failure = Failure("content_policy", "prompt refused") if state == FAILED else None
            upstream = {COMPLETED: "completed", FAILED: "failed"}.get(state)
            record_transition(
                session, task, state, observed_at=later, upstream_state=upstream, failure=failure
            )
    session.flush()
    return task


def add_delivery(
    session: Session,
    task: Task,
    *,
    created_at: datetime = T0,
    status: str = DELIVERY_PENDING,
    event: str = "task.completed",
    attempt_codes: tuple[int | None, ...] = (),
) -> WebhookDelivery:
    """A delivery of `task` with one attempt per status code (None: a connection error)."""
    delivery = WebhookDelivery(
        id=new_delivery_id(),
        client_id=task.client_id,
        task=task,
        event=event,
        callback_url=task.callback_url or "https://hooks.example.com/tracker",
        destination=destination_of(task.callback_url or "https://hooks.example.com/tracker"),
        payload=webhook_payload(
            task, event=event, previous_state="running", observed_at=created_at
        ),
        status=status,
        attempts=len(attempt_codes),
        next_attempt_at=created_at if status == DELIVERY_PENDING else None,
        created_at=created_at,
        updated_at=created_at,
        delivered_at=created_at if status == DELIVERY_SUCCEEDED else None,
        last_status_code=attempt_codes[-1] if attempt_codes else None,
        failure_code="gave_up" if status == DELIVERY_FAILED else None,
        failure_message="no 2xx after every attempt" if status == DELIVERY_FAILED else None,
    )
    for number, code in enumerate(attempt_codes, start=1):
        delivery.attempt_log.append(
            WebhookAttempt(
                attempt=number,
                started_at=created_at + timedelta(seconds=number),
                duration_ms=12 * number,
                status_code=code,
                response_excerpt=None if code is None else f"answer {code}",
                error="connection refused" if code is None else None,
            )
        )
    session.add(delivery)
    session.flush()
    return delivery
