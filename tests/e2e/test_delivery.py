"""Webhooks end to end: API, worker and beat processes, the simulator, a loopback receiver."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from tests.conftest import _engine_for
from tests.support.processes import TrackerProcesses, wait_until
from tests.support.receiver import Receiver, Reply
from tests.support.sim import SimulatorHandle
from tracker.config import load_settings
from tracker.db.models import TaskTransition, WebhookDelivery
from tracker.devtools.demo import free_port
from tracker.states import TERMINAL_STATES
from tracker.tracking.clients import NewClient, create_client

pytestmark = pytest.mark.slow


@pytest.fixture
def group(
    pg_url: str, broker: str, simulator: SimulatorHandle, tmp_path: Path
) -> Iterator[TrackerProcesses]:
    (tmp_path / "metrics").mkdir()
    env = {
        "TRACKER_DATABASE_URL": pg_url,
        "TRACKER_BROKER_URL": broker,
        "TRACKER_UPSTREAM_URL": simulator.url,
        "TRACKER_UPSTREAM_TOKEN": "upstream-secret-token-0123456789",
        "TRACKER_POLL_INTERVAL": "1",
        "TRACKER_MAX_POLL_INTERVAL": "2",
        "TRACKER_SWEEP_INTERVAL": "1",
        "TRACKER_WEBHOOK_ALLOW_PRIVATE": "true",
        "TRACKER_WEBHOOK_RETRY_SCHEDULE": "0,1,1,1",
        "TRACKER_METRICS_PORT": "0",
        "TRACKER_API_PORT": str(free_port()),
        "TRACKER_LOG_LEVEL": "DEBUG",
        "TRACKER_LOG_FORMAT": "json",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    processes = TrackerProcesses(env, tmp_path)
    yield processes
    processes.stop_all()


def new_client(db_url: str) -> NewClient:
    with Session(_engine_for(db_url), expire_on_commit=False) as session, session.begin():
        return create_client(session, "shop")


def count(db_url: str, query: object) -> int:
    with Session(_engine_for(db_url)) as session:
        return int(session.scalar(query) or 0)  # type: ignore[call-overload]


def test_a_run_of_200_tasks_delivers_every_terminal_event_signed_and_counted(
    pg_url: str, group: TrackerProcesses, simulator: SimulatorHandle, receiver: Receiver
) -> None:
    """One delivery row per terminal transition, each received and verified by the
    reference library; /metrics agrees; no secret appears in any process's log."""
    owner = new_client(pg_url)
    ids = simulator.seed(
        [
            {"outcome": ("failed" if n % 4 == 0 else "completed"), "duration": n % 5}
            for n in range(200)
        ]
    )
    api_url = f"http://127.0.0.1:{group.env['TRACKER_API_PORT']}"
    group.start("api")
    group.worker()
    group.beat()
    wait_until(lambda: _answers(f"{api_url}/healthz"), timeout=30, what="the API")
    auth = {"authorization": f"Bearer {owner.api_key}"}
    body = {"tasks": [{"task_id": i, "callback_url": receiver.url()} for i in ids]}
    answer = requests.post(f"{api_url}/v1/tasks/batch", json=body, headers=auth, timeout=30)
    assert [item["status"] for item in answer.json()["items"]] == [201] * 200

    wait_until(
        lambda: (
            count(pg_url, select(func.count()).where(WebhookDelivery.status == "succeeded")) == 200
        ),
        timeout=120,
        what="200 webhooks delivered",
    )
    terminal = count(
        pg_url, select(func.count()).where(TaskTransition.to_state.in_(TERMINAL_STATES))
    )
    assert terminal == 200
    assert count(pg_url, select(func.count()).select_from(WebhookDelivery)) == 200
    received = {r.headers["webhook-id"]: r for r in receiver.requests}
    assert len(received) == 200
    verifier = Webhook(owner.webhook_secret)
    for request in received.values():
        verifier.verify(request.body, request.headers)
    states = {json.loads(r.body)["data"]["state"] for r in received.values()}
    assert states == {"completed", "failed"}

    scraped = requests.get(f"{api_url}/metrics", timeout=10).text
    assert 'tracker_tasks{state="completed"} 150.0' in scraped
    assert 'tracker_tasks{state="failed"} 50.0' in scraped
    assert f'tracker_deliveries_total{{outcome="succeeded"}} {len(received)}.0' in scraped
    assert 'tracker_outbox_backlog{kind="due"} 0.0' in scraped
    for family in (
        "tracker_transitions_total",
        "tracker_upstream_requests_total",
        "tracker_upstream_request_seconds_bucket",
        "tracker_upstream_budget_wait_seconds_count",
        "tracker_poll_lag_seconds_count",
        "tracker_delivery_attempt_seconds_count",
        "tracker_completion_to_delivery_seconds_count",
    ):
        assert family in scraped, f"{family} missing from /metrics"

    group.stop_all()
    logs = "".join(p.read_text(errors="replace") for p in group.workdir.glob("*.log"))
    assert "tracker.polling" in logs or "tracker.api" in logs  # the logs are really there
    for secret in (owner.api_key, owner.webhook_secret, group.env["TRACKER_UPSTREAM_TOKEN"]):
        assert secret not in logs


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_a_worker_killed_mid_delivery_loses_nothing(
    pg_url: str, group: TrackerProcesses, simulator: SimulatorHandle, receiver: Receiver
) -> None:
    """SIGKILL while a webhook is in flight: after the lease expires, it is attempted again."""
    group.env["TRACKER_DELIVERY_LEASE"] = "3"
    group.env["TRACKER_WEBHOOK_TIMEOUT"] = "10"
    owner = new_client(pg_url)
    [task_id] = simulator.seed([{"outcome": "completed", "duration": 0}])
    receiver.script("/slow", Reply(200, delay=8))
    settings = load_settings(database_url=pg_url, _env_file=None)
    with Session(_engine_for(pg_url)) as session, session.begin():
        from tracker.tracking.registration import register_task
        from tracker.tracking.schemas import TaskRegistration

        register_task(
            session,
            owner.client,
            TaskRegistration(task_id=task_id, callback_url=receiver.url("/slow")),
            settings=settings,
        )
    first = group.worker()
    group.beat()
    receiver.wait_for(1, timeout=30)
    group.kill(first)  # SIGKILL, with the attempt in flight
    group.worker()
    wait_until(
        lambda: count(pg_url, select(func.count()).where(WebhookDelivery.status == "succeeded")),
        timeout=60,
        what="the delivery to succeed after the kill",
    )
    ids = [r.headers["webhook-id"] for r in receiver.requests_to("/slow")]
    assert len(ids) == 2
    assert len(set(ids)) == 1  # the same webhook-id: the receiver can deduplicate
    claimed = count(pg_url, select(func.count()).where(WebhookDelivery.claimed_until.is_not(None)))
    assert claimed == 0
    # The killed attempt left no row; the one that answered is the only one logged.
    assert count(pg_url, select(func.sum(WebhookDelivery.attempts))) == 1


def test_failed_first_attempts_are_retried_by_their_countdown_doorbell(
    pg_url: str, group: TrackerProcesses, simulator: SimulatorHandle, receiver: Receiver
) -> None:
    """A batch whose receivers answer 500 is rung again for the 1 s retry, long before
    the sweep would find the rows (it waits until they are 10 s overdue)."""
    owner = new_client(pg_url)
    task_ids = simulator.seed([{"outcome": "completed", "duration": 0}] * 6)
    receiver.script("/flaky", *[Reply(500)] * 6)
    settings = load_settings(database_url=pg_url, _env_file=None)
    with Session(_engine_for(pg_url)) as session, session.begin():
        from tracker.tracking.registration import register_task
        from tracker.tracking.schemas import TaskRegistration

        for task_id in task_ids:
            register_task(
                session,
                owner.client,
                TaskRegistration(task_id=task_id, callback_url=receiver.url("/flaky")),
                settings=settings,
            )
    group.worker()
    group.beat()
    first = receiver.wait_for(6, timeout=30)
    failed_at = max(request.at for request in first)
    received = receiver.wait_for(12, timeout=30)

    retried_at = max(request.at for request in received)
    assert retried_at - failed_at < 6  # retry due after 0.8-1.2 s; the sweep rings at 10 s
    wait_until(
        lambda: (
            count(pg_url, select(func.count()).where(WebhookDelivery.status == "succeeded")) == 6
        ),
        timeout=30,
        what="6 webhooks delivered on their second attempt",
    )
    # Six 500s and six 200s, whichever delivery got which: twelve attempts, six webhook-ids.
    assert count(pg_url, select(func.sum(WebhookDelivery.attempts))) == 12
    assert len({request.headers["webhook-id"] for request in received}) == 6


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    server = shutil.which("redis-server")
    assert server, "redis-server is needed for this test (apt-get install redis-server)"
    port = free_port()
    yield port, tmp_path
    subprocess.run(
        ["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False, capture_output=True
    )


def _start_redis(port: int, workdir: Path) -> None:
    subprocess.run(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "yes",
            "--dir",
            str(workdir),
        ],
        check=True,
    )
    wait_until(lambda: redis.Redis(port=port).ping(), timeout=10, what="the private redis-server")


def test_readyz_turns_503_while_redis_is_down_and_back_when_it_returns(
    pg_url: str, private_redis: tuple[int, Path]
) -> None:
    from fastapi.testclient import TestClient

    from tracker.api import create_app

    port, workdir = private_redis
    _start_redis(port, workdir)
    settings = load_settings(
        database_url=pg_url, broker_url=f"redis://127.0.0.1:{port}/0", _env_file=None
    )
    with TestClient(create_app(settings)) as api:
        assert api.get("/readyz").status_code == 200
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], check=True)
        down = api.get("/readyz")
        assert down.status_code == 503
        assert down.json()["checks"]["broker"] != "ok"
        _start_redis(port, workdir)
        assert api.get("/readyz").status_code == 200
