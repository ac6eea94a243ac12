"""State changes and the outbox: a transition, its history row and its webhooks, together.

`record_transition` is the one way a task changes state. It does not commit: the
caller's transaction holds the task update, the history row and the delivery
rows (one transaction per observation), so they land together or not at all.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from tracker.clock import isoformat_z
from tracker.db.models import Task, TaskTransition, WebhookDelivery
from tracker.db.queries import task_outputs
from tracker.errors import InvalidTransition
from tracker.observability.metrics import TRANSITIONS
from tracker.states import (
    DELIVERY_PENDING,
    DELIVERY_SUPERSEDED,
    EVENT_FOR_STATE,
    RUNNING,
    can_transition,
    is_terminal,
)
from tracker.tracking.normalise import Failure
from tracker.tracking.schemas import destination_of


def new_delivery_id() -> str:
    """A `webhook-id`: unique, URL-safe, and stable across every retry of the event."""
    return "msg_" + secrets.token_hex(16)


def webhook_payload(
    task: Task, *, event: str, previous_state: str | None, observed_at: datetime
) -> str:
    """The exact JSON body of a webhook (docs/webhooks.md), fixed when the event happens."""
    body: dict[str, Any] = {
        "type": event,
        "timestamp": isoformat_z(observed_at),
        "data": {
            "task_id": task.task_id,
            "service": task.service,
            "state": task.state,
            "previous_state": previous_state,
            "upstream_state": task.upstream_state,
            "metadata": task.metadata_,
            "failure": task.failure,
            "created_at": isoformat_z(task.created_at),
            "finished_at": isoformat_z(task.finished_at),
            "progress": task.progress,
            "outputs": task_outputs(task),
            "record": task.record,
        },
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def record_transition(
    session: Session,
    task: Task,
    to_state: str,
    *,
    observed_at: datetime,
    upstream_state: str | None = None,
    record: dict[str, Any] | None = None,
    failure: Failure | None = None,
    progress: int | None = None,
) -> list[WebhookDelivery]:
    """Move `task` to `to_state`: history row, task update, outbox rows; returns new deliveries."""
    from_state = task.state
    if not can_transition(from_state, to_state):
        raise InvalidTransition(
            f"task {task.task_id!r} cannot go from {from_state!r} to {to_state!r}"
        )
    task.state = to_state
    if upstream_state is not None:
        task.upstream_state = upstream_state
    if record is not None:
        task.record = record
    if progress is not None:
        task.progress = progress
    task.updated_at = observed_at
    if failure is not None:
        task.failure_code, task.failure_message = failure.code, failure.message
    if is_terminal(to_state):
        task.finished_at = observed_at
        task.next_poll_at = None
        task.claimed_until = None
        _supersede_running_events(session, task, observed_at)

    session.add(
        TaskTransition(
            task=task,
            from_state=from_state,
            to_state=to_state,
            upstream_state=upstream_state,
            observed_at=observed_at,
            record=record,
        )
    )

    TRANSITIONS.labels(to_state=to_state).inc()

    event = EVENT_FOR_STATE.get(to_state)
    if event is None or event not in task.events or not task.callback_url:
        return []
    delivery = WebhookDelivery(
        id=new_delivery_id(),
        client_id=task.client_id,
        task=task,
        event=event,
        callback_url=task.callback_url,
        destination=destination_of(task.callback_url),
        payload=webhook_payload(
            task, event=event, previous_state=from_state, observed_at=observed_at
        ),
        status=DELIVERY_PENDING,
        attempts=0,
        next_attempt_at=observed_at,
        created_at=observed_at,
        updated_at=observed_at,
    )
    session.add(delivery)
    return [delivery]


def _supersede_running_events(session: Session, task: Task, now: datetime) -> None:
    """A `task.running` webhook not yet delivered would arrive after the terminal one: drop it."""
    if task.id is None or EVENT_FOR_STATE[RUNNING] not in task.events:
        return  # nothing to drop; and no statement, which would flush the session first
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.task_row_id == task.id,
            WebhookDelivery.event == EVENT_FOR_STATE[RUNNING],
            WebhookDelivery.status == DELIVERY_PENDING,
        )
        .values(status=DELIVERY_SUPERSEDED, next_attempt_at=None, updated_at=now)
        .execution_options(synchronize_session="fetch")
    )
