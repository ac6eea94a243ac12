"""The tracker's vocabulary: task states, webhook events, delivery statuses; the state machine.

    pending -> running -> completed | failed
    pending | running -> timed_out | cancelled

Terminal states are final. A base module: it imports nothing of the tracker, and the
database's CHECK constraints, the API and the CLI all take their words from here.
"""

from __future__ import annotations

PENDING = "pending"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
TIMED_OUT = "timed_out"
CANCELLED = "cancelled"

ACTIVE_STATES = frozenset({PENDING, RUNNING})
TERMINAL_STATES = frozenset({COMPLETED, FAILED, TIMED_OUT, CANCELLED})
TASK_STATES = ACTIVE_STATES | TERMINAL_STATES

# Webhook events a registration can subscribe to, and the state each announces.
EVENT_FOR_STATE = {
    RUNNING: "task.running",
    COMPLETED: "task.completed",
    FAILED: "task.failed",
    TIMED_OUT: "task.timed_out",
}
EVENTS = frozenset(EVENT_FOR_STATE.values())
DEFAULT_EVENTS = ("task.completed", "task.failed", "task.timed_out")

DELIVERY_PENDING = "pending"
DELIVERY_SUCCEEDED = "succeeded"
DELIVERY_FAILED = "failed"
DELIVERY_SUPERSEDED = "superseded"
DELIVERY_STATUSES = frozenset(
    {DELIVERY_PENDING, DELIVERY_SUCCEEDED, DELIVERY_FAILED, DELIVERY_SUPERSEDED}
)

# Operational events, sent to a client's `operations_url`: never about themselves.
DELIVERY_FAILING = "delivery.failing"
DELIVERY_EXHAUSTED = "delivery.exhausted"
DESTINATION_OPENED = "destination.opened"
DESTINATION_DISABLED = "destination.disabled"
DESTINATION_RECOVERED = "destination.recovered"
OPERATIONAL_EVENTS = frozenset(
    {
        DELIVERY_FAILING,
        DELIVERY_EXHAUSTED,
        DESTINATION_OPENED,
        DESTINATION_DISABLED,
        DESTINATION_RECOVERED,
    }
)

# A webhook destination's circuit: attempts flow; held behind probes; given up on.
DESTINATION_HEALTHY = "healthy"
DESTINATION_OPEN = "open"
DESTINATION_DISABLED_STATE = "disabled"
DESTINATION_STATES = frozenset({DESTINATION_HEALTHY, DESTINATION_OPEN, DESTINATION_DISABLED_STATE})


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES


def can_transition(current: str, new: str) -> bool:
    """Whether `current -> new` is a move forward; terminal states are final."""
    if current in TERMINAL_STATES or new == current:
        return False
    if current == RUNNING:
        return new != PENDING
    return new in TASK_STATES
