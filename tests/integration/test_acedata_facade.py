"""`POST /acedata/{service}/tasks`: AceData's task protocol answered by the tracker, driven by
the vendor's own SDK (`acedatacloud`) pointed at the tracker with a tracker API key."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
import requests
from acedatacloud import AceDataCloud, AuthenticationError
from acedatacloud._runtime.tasks import task_status
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from tests.support.servers import serving
from tests.support.sim import SimulatorHandle
from tracker.api import create_app
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.engine import session_factory
from tracker.db.models import Client, Task, task_schedule_table
from tracker.tracking.clients import NewClient, create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration
from tracker.worker.jobs import claim_and_plan
from tracker.worker.pollers import WorkerContext, poll_with_tokens


@pytest.fixture
def facade_settings(settings: Settings, simulator: SimulatorHandle) -> Settings:
    return settings.model_copy(update={"upstream_url": simulator.url, "poll_interval": 0.5})


@pytest.fixture
def tracker_url(facade_settings: Settings) -> Iterator[str]:
    with serving(create_app(facade_settings, poll_doorbell=lambda ids: None)) as url:
        yield url


def sdk(tracker_url: str, api_key: str) -> AceDataCloud:
    return AceDataCloud(api_token=api_key, base_url=f"{tracker_url}/acedata", max_retries=0)


def owners(session: Session) -> dict[str, str]:
    session.expire_all()
    rows = session.execute(select(Task.task_id, Client.name).join(Client)).all()
    session.rollback()
    return {f"{row[1]}:{row[0]}": row[1] for row in rows}


def test_the_vendor_sdk_gets_a_task_the_tracker_did_not_know_and_it_is_tracked_from_then(
    tracker_url: str, client: NewClient, simulator: SimulatorHandle, session: Session
) -> None:
    done, failed = simulator.seed(
        [{"outcome": "completed", "duration": 0}, {"outcome": "failed", "duration": 0}]
    )
    with sdk(tracker_url, client.api_key) as vendor:
        records = [vendor.tasks.get(task_id, service="luma") for task_id in (done, failed)]
    assert [r["id"] for r in records] == [done, failed]
    assert [task_status(r) for r in records] == ["succeeded", "failed"]
    assert records[0]["response"] == simulator.task(done)["record"]["response"]
    # Fetched once and registered for this client, with the record it fetched.
    session.expire_all()
    states = {t.task_id: t.state for t in session.scalars(select(Task))}
    assert states == {done: "completed", failed: "failed"}
    session.rollback()
    asked = simulator.stats()["items_requested"]
    with sdk(tracker_url, client.api_key) as vendor:
        again = vendor.tasks.get(done, service="luma")
    assert again == records[0]
    assert simulator.stats()["items_requested"] == asked  # answered from the stored record


def test_the_vendor_sdk_waits_for_a_task_the_tracker_polls(
    tracker_url: str,
    client: NewClient,
    simulator: SimulatorHandle,
    facade_settings: Settings,
    engine: Engine,
) -> None:
    (task_id,) = simulator.seed([{"outcome": "completed", "duration": 2.0}])
    ctx = WorkerContext.create(facade_settings, session_factory(engine))
    stop = threading.Event()

    def poll() -> None:  # what workers and beat do, in-process
        while not stop.wait(0.2):
            for _ in poll_with_tokens(ctx, claim_and_plan(ctx, utcnow())):
                pass

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        with sdk(tracker_url, client.api_key) as vendor:
            record = vendor.tasks.wait(task_id, service="luma", poll_interval=0.3, max_wait=20)
    finally:
        stop.set()
        poller.join(timeout=10)
    assert task_status(record) == "succeeded"
    assert record["response"]["video_url"].endswith(".mp4")


def test_another_clients_task_is_an_unknown_id(
    tracker_url: str,
    client: NewClient,
    simulator: SimulatorHandle,
    session: Session,
    facade_settings: Settings,
) -> None:
    theirs, mine = simulator.seed([{"outcome": "completed", "duration": 0}] * 2)
    other = create_client(session, "globex")
    register_task(session, other.client, TaskRegistration(task_id=theirs), settings=facade_settings)
    session.commit()
    with sdk(tracker_url, client.api_key) as vendor:
        assert vendor.tasks.get(theirs, service="luma") == {}
    batch = requests.post(
        f"{tracker_url}/acedata/luma/tasks",
        json={"ids": [theirs, mine, "never-heard-of"], "action": "retrieve_batch"},
        headers={"Authorization": f"Bearer {client.api_key}"},
        timeout=10,
    ).json()
    assert [item["id"] for item in batch["items"]] == [mine]
    assert batch["count"] == 1
    assert sorted(owners(session)) == sorted([f"globex:{theirs}", f"acme:{mine}"])


def test_errors_come_in_the_vendors_shape(
    tracker_url: str, client: NewClient, simulator: SimulatorHandle
) -> None:
    (task_id,) = simulator.seed([{"outcome": "completed", "duration": 0}])
    with (
        sdk(tracker_url, "trk_not-a-key") as vendor,
        pytest.raises(AuthenticationError),
    ):
        vendor.tasks.get(task_id, service="luma")
    auth = {"Authorization": f"Bearer {client.api_key}"}
    for body in ({"action": "generate"}, {"id": "../x", "action": "retrieve"}, ["no"]):
        answer = requests.post(
            f"{tracker_url}/acedata/luma/tasks", json=body, headers=auth, timeout=10
        )
        assert answer.status_code == 400
        error = answer.json()
        assert error["success"] is False
        assert error["error"]["code"] == "bad_request"
        assert set(error) == {"success", "error", "trace_id"}
    simulator.configure(error_500_share=1.0)
    answer = requests.post(
        f"{tracker_url}/acedata/luma/tasks",
        json={"id": "unknown-yet", "action": "retrieve"},
        headers=auth,
        timeout=10,
    )
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "api_error"


def test_asking_keeps_an_old_tasks_polls_at_the_poll_interval(
    tracker_url: str,
    client: NewClient,
    session: Session,
    facade_settings: Settings,
) -> None:
    task = register_task(
        session, client.client, TaskRegistration(task_id="old-one"), settings=facade_settings
    ).task
    later = utcnow() + timedelta(seconds=60)
    session.execute(
        update(task_schedule_table)
        .where(task_schedule_table.c.task_row_id == task.id)
        .values(next_poll_at=later)
    )
    task.record = {"id": "old-one", "response": {"state": "processing"}}
    session.commit()
    answer = requests.post(
        f"{tracker_url}/acedata/luma/tasks",
        json={"id": "old-one", "action": "retrieve"},
        headers={"Authorization": f"Bearer {client.api_key}"},
        timeout=10,
    )
    assert answer.json() == {"id": "old-one", "response": {"state": "processing"}}
    session.expire_all()
    due = session.scalar(
        select(task_schedule_table.c.next_poll_at).where(
            task_schedule_table.c.task_row_id == task.id
        )
    )
    session.rollback()
    assert due is not None
    assert due <= utcnow() + timedelta(seconds=facade_settings.poll_interval)
