"""The simulator honours `callback_url` as AceData does: one unsigned POST of the result when
the task ends, no retries."""

from __future__ import annotations

import json
import time

import requests

from tests.support.receiver import Receiver, Reply
from tests.support.sim import SimulatorHandle


def generate(simulator: SimulatorHandle, callback_url: str, *, duration: float = 0.3) -> str:
    simulator.configure(duration_min=duration, duration_max=duration, failure_share=0.0)
    answer = requests.post(
        f"{simulator.url}/luma/videos",
        json={"action": "generate", "prompt": "A fox", "callback_url": callback_url},
        timeout=10,
    ).json()
    task_id: str = answer["task_id"]
    return task_id


def test_a_settled_task_posts_its_result_once_unsigned(
    simulator: SimulatorHandle, receiver: Receiver
) -> None:
    task_id = generate(simulator, receiver.url("/acedata"))
    (callback,) = receiver.wait_for(1, timeout=10)
    body = json.loads(callback.body)
    assert body["success"] is True
    assert body["task_id"] == task_id
    assert body["trace_id"] == simulator.task(task_id)["record"]["trace_id"]
    assert body["video_url"].endswith(".mp4")
    assert body["state"] == "completed"
    assert not any("signature" in name for name in callback.headers)
    settled_at = simulator.task(task_id)["settled_at"]
    assert settled_at is not None
    time.sleep(0.5)
    assert len(receiver.requests) == 1
    assert simulator.stats()["callbacks_sent"] == 1


def test_a_failed_callback_is_not_retried_and_a_failure_carries_its_error(
    simulator: SimulatorHandle, receiver: Receiver
) -> None:
    receiver.script("/acedata", Reply(500))
    task_id = generate(simulator, receiver.url("/acedata"), duration=60)
    simulator.finish(task_id, "failed")  # settled by hand: calls back at once
    (callback,) = receiver.wait_for(1, timeout=10)
    body = json.loads(callback.body)
    assert body == {
        "success": False,
        "task_id": task_id,
        "trace_id": simulator.task(task_id)["record"]["trace_id"],
        "error": body["error"],
    }
    assert set(body["error"]) == {"code", "message"}
    time.sleep(1.0)
    assert len(receiver.requests) == 1  # no retry after the 500
    assert simulator.stats()["callbacks_failed"] == 1


def test_dropped_callbacks_never_come(simulator: SimulatorHandle, receiver: Receiver) -> None:
    simulator.configure(callback_drop_share=1.0)
    generate(simulator, receiver.url("/acedata"), duration=0.1)
    time.sleep(1.0)
    assert receiver.requests == []
    assert simulator.stats()["callbacks_dropped"] == 1
