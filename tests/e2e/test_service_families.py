"""Every family of AceData task services end to end: real worker and beat, the simulator
speaking each service's shapes, a loopback receiver.

For each family: the right terminal state, no terminal webhook before the upstream
ended the task (a Suno song is not announced at its first preview, a Midjourney image
not at its first grid), and the artifacts in the payload's `outputs`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.conftest import _engine_for
from tests.support.processes import TrackerProcesses, wait_until
from tests.support.receiver import Receiver
from tests.support.sim import SimulatorHandle
from tracker.config import load_settings
from tracker.db.models import Task
from tracker.states import ACTIVE_STATES
from tracker.tracking.clients import create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration

pytestmark = pytest.mark.slow

# service -> (family, the artifact its payload must carry)
FAMILIES = {
    "luma": ("response.state", "video"),
    "suno": ("top-level state, songs streaming previews", "audio"),
    "producer": ("top-level state, per-song progress", "audio"),
    "midjourney": ("no word: progress and grids until finished_at", "image"),
    "veo": ("response.data[].state", "video"),
    "seedance": ("response.data.status", "video"),
    "nano-banana": ("no word: success and finished_at", "image"),
    "seedream": ("no word, no finished_at: success and an image", "image"),
    "minimax": ("task.status", "video"),
    "maestro": ("top-level status and progress.percent", "video"),
}
EVENTS = ["task.running", "task.completed", "task.failed"]


@pytest.fixture
def group(
    pg_url: str, broker: str, simulator: SimulatorHandle, tmp_path: Path
) -> Iterator[TrackerProcesses]:
    env = {
        "TRACKER_DATABASE_URL": pg_url,
        "TRACKER_BROKER_URL": broker,
        "TRACKER_UPSTREAM_URL": simulator.url,
        "TRACKER_UPSTREAM_TOKEN": "test-token",
        "TRACKER_POLL_INTERVAL": "0.5",
        "TRACKER_MAX_POLL_INTERVAL": "1",
        # The services' own paces (10 s for songs and videos) would make this test slow.
        "TRACKER_SERVICE_POLL_INTERVALS": ",".join(f"{s}=0.5" for s in FAMILIES),
        "TRACKER_SWEEP_INTERVAL": "1",
        "TRACKER_POLL_LEASE": "0.3",
        "TRACKER_WEBHOOK_ALLOW_PRIVATE": "true",
        "TRACKER_METRICS_PORT": "0",
        "TRACKER_LOG_FORMAT": "json",
    }
    processes = TrackerProcesses(env, tmp_path)
    yield processes
    processes.stop_all()


def test_each_family_ends_right_never_early_and_with_its_outputs(
    pg_url: str, group: TrackerProcesses, simulator: SimulatorHandle, receiver: Receiver
) -> None:
    seeds = []
    for service in FAMILIES:
        seeds += [
            {"service": service, "outcome": "completed", "duration": 6},
            {"service": service, "outcome": "failed", "duration": 4},
        ]
    ids = simulator.seed(seeds)
    expected = {
        (seed["service"], task_id): seed["outcome"]
        for seed, task_id in zip(seeds, ids, strict=True)
    }
    settings = load_settings(database_url=pg_url, _env_file=None)
    with Session(_engine_for(pg_url)) as session, session.begin():
        owner = create_client(session, "studio").client
        for service, task_id in expected:
            registration = TaskRegistration(
                task_id=task_id, service=service, callback_url=receiver.url(), events=EVENTS
            )
            register_task(session, owner, registration, settings=settings)
    group.worker()
    group.beat()

    def finished() -> bool:
        with Session(_engine_for(pg_url)) as session:
            states = session.scalars(select(Task.state)).all()
        return all(state not in ACTIVE_STATES for state in states)

    wait_until(finished, timeout=90, what="every family's tasks terminal")
    wait_until(
        lambda: (
            len([r for r in receiver.requests if b'"task.running"' not in r.body]) >= len(expected)
        ),
        timeout=30,
        what="every terminal webhook",
    )
    with Session(_engine_for(pg_url)) as session:
        states = {(t.service, t.task_id): t.state for t in session.scalars(select(Task))}
    assert states == expected

    terminal = [json.loads(r.body) for r in receiver.requests]
    terminal = [p for p in terminal if p["type"] != "task.running"]
    assert sorted((p["data"]["service"], p["data"]["task_id"]) for p in terminal) == sorted(
        expected
    )
    for payload in terminal:
        data = payload["data"]
        service = data["service"]
        settled_at = simulator.task(data["task_id"])["settled_at"]
        observed = datetime.fromisoformat(payload["timestamp"]).timestamp()
        assert settled_at is not None, service
        assert observed >= settled_at, (service, FAMILIES[service])
        if data["state"] == "completed":
            kinds = {output["type"] for output in data["outputs"]}
            assert FAMILIES[service][1] in kinds, (service, data["outputs"])
            assert all(output["url"].startswith("https://") for output in data["outputs"])
        else:
            assert (data["outputs"], data["failure"] is not None) == ([], True)
    # In flight, the songs streamed previews and the images grids: running, not done.
    running = {
        json.loads(r.body)["data"]["service"]
        for r in receiver.requests
        if json.loads(r.body)["type"] == "task.running"
    }
    assert {"suno", "midjourney"} <= running
