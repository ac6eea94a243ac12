"""The state vocabulary is written once: the API's resource types agree with it."""

from __future__ import annotations

from typing import get_args

from tracker.api.resources import DeliveryStatus, TaskState
from tracker.states import DELIVERY_STATUSES, TASK_STATES


def test_openapi_task_states_are_the_state_machines() -> None:
    assert set(get_args(TaskState)) == TASK_STATES


def test_openapi_delivery_statuses_are_the_outboxs() -> None:
    assert set(get_args(DeliveryStatus)) == DELIVERY_STATUSES
