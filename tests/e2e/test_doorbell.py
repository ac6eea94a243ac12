"""The doorbell end to end, with real processes: API, worker and beat, the simulator calling
back, a receiver. Polling is slowed to 30 s, so only the doorbell can explain a webhook
that comes within a second or two of the task's end."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy.orm import Session

from tests.support.processes import TrackerProcesses, wait_until
from tests.support.receiver import Receiver
from tests.support.sim import SimulatorHandle
from tracker.db.engine import make_engine
from tracker.devtools.demo import free_port
from tracker.tracking.clients import create_client

pytestmark = pytest.mark.slow

TASKS = 6


@pytest.fixture
def tracker(
    pg_url: str, broker: str, simulator: SimulatorHandle, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    """The tracker's API URL and a client's API key, with a worker and a beat running."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    env = {
        "TRACKER_DATABASE_URL": pg_url,
        "TRACKER_BROKER_URL": broker,
        "TRACKER_UPSTREAM_URL": simulator.url,
        "TRACKER_UPSTREAM_TOKEN": "test-token",
        "TRACKER_PUBLIC_URL": api_url,
        "TRACKER_POLL_INTERVAL": "30",
        "TRACKER_MAX_POLL_INTERVAL": "60",
        "TRACKER_WEBHOOK_ALLOW_PRIVATE": "true",
        "TRACKER_METRICS_PORT": "0",
        "TRACKER_LOG_FORMAT": "json",
    }
    engine = make_engine(pg_url)
    with Session(engine) as session, session.begin():
        api_key = create_client(session, "shop").api_key
    engine.dispose()
    group = TrackerProcesses(env, tmp_path)
    group.start("api", "--port", str(port))
    group.worker()
    group.beat()
    try:
        wait_until(lambda: _ready(api_url), timeout=30, what="the API to answer")
        yield api_url, api_key
    except BaseException:
        print(group.logs())
        raise
    finally:
        group.stop_all()


def _ready(api_url: str) -> bool:
    try:
        return requests.get(f"{api_url}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_a_submitted_tasks_end_reaches_its_webhook_in_about_a_round_trip(
    tracker: tuple[str, str], simulator: SimulatorHandle, receiver: Receiver
) -> None:
    api_url, api_key = tracker
    simulator.configure(duration_min=2.0, duration_max=4.0, failure_share=0.0)
    submitted = []
    for n in range(TASKS):
        answer = requests.post(
            f"{api_url}/v1/luma/submit",
            json={
                "endpoint": "videos",
                "request": {"action": "generate", "prompt": f"fox {n}"},
                "callback_url": receiver.url("/hook"),
            },
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10,
        )
        assert answer.status_code == 201, answer.text
        submitted.append(answer.json()["task"]["task_id"])
    # The first poll (due at registration) sees each task running; the next is 30 s away.
    received = receiver.wait_for(TASKS, timeout=25)
    arrived = {json.loads(r.body)["data"]["task_id"]: r for r in received}
    assert set(arrived) == set(submitted)
    # Counted once the simulator has read the doorbell's 204, which may come after the poll.
    wait_until(
        lambda: simulator.stats()["callbacks_sent"] == TASKS, timeout=5, what="every 204 read"
    )
    now_wall, now_mono = time.time(), time.monotonic()
    for task_id, webhook in arrived.items():
        assert json.loads(webhook.body)["type"] == "task.completed"
        settled_at = simulator.task(task_id)["settled_at"]
        delay = (webhook.at - now_mono) - (settled_at - now_wall)
        assert delay < 3.0, f"{task_id}: webhook {delay:.2f} s after the task ended"
