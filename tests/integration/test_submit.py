"""`POST /v1/{service}/submit` and `POST /v1/doorbell/{token}` over the API, against the
simulator: forwarded once, the doorbell as callback, vendor errors relayed, idempotent."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tests.support.sim import SimulatorHandle
from tracker.api import create_app
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.models import Task, task_schedule_table
from tracker.polling.doorbell import doorbell_hash
from tracker.tracking.clients import NewClient
from tracker.upstream.credentials import set_client_token

PUBLIC_URL = "https://tracker.example"
VIDEO = {"action": "generate", "prompt": "A fox in the snow"}


@pytest.fixture
def rung() -> list[int]:
    return []


@pytest.fixture
def submit_settings(settings: Settings, simulator: SimulatorHandle) -> Settings:
    return settings.model_copy(update={"upstream_url": simulator.url, "public_url": PUBLIC_URL})


@pytest.fixture
def api(submit_settings: Settings, rung: list[int]) -> TestClient:
    return TestClient(create_app(submit_settings, poll_doorbell=rung.extend))


def submit(api: TestClient, auth: dict[str, str], **body: Any) -> Any:
    body.setdefault("endpoint", "videos")
    body.setdefault("request", VIDEO)
    return api.post("/v1/luma/submit", json=body, headers=auth)


def generated(simulator: SimulatorHandle) -> int:
    return int(simulator.stats()["requests_by_action"].get("generate", 0))


def test_submit_forwards_with_the_doorbell_and_registers_the_task(
    api: TestClient, auth: dict[str, str], simulator: SimulatorHandle, session: Session
) -> None:
    answer = submit(
        api,
        auth,
        request={**VIDEO, "callback_url": "https://mine.example/acedata"},
        callback_url="https://hooks.example/tracker",
        metadata={"order": 7},
        events=["task.completed"],
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    task_id = body["upstream"]["task_id"]
    assert body["upstream"]["success"] is True
    assert body["task"]["task_id"] == task_id
    assert body["task"]["state"] == "pending"
    assert body["task"]["callback_url"] == "https://hooks.example/tracker"
    assert body["task"]["metadata"] == {"order": 7}
    # The vendor got the request unchanged but for callback_url: the task's doorbell.
    sent = simulator.task(task_id)["record"]["request"]
    doorbell = sent.pop("callback_url")
    assert sent == VIDEO
    prefix = f"{PUBLIC_URL}/v1/doorbell/"
    assert doorbell.startswith(prefix)
    token = doorbell.removeprefix(prefix)
    assert len(token) >= 32
    stored = session.scalar(select(Task).where(Task.task_id == task_id))
    assert stored is not None
    assert stored.doorbell_hash == doorbell_hash(token)  # the token itself is not stored
    assert generated(simulator) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"endpoint": None}, "endpoint"),
        ({"endpoint": "tasks"}, "endpoint"),
        ({"endpoint": "../admin"}, "endpoint"),
        ({"request": ["not", "an", "object"]}, "request"),
        ({"callback_url": "ftp://files.example/"}, "callback_url"),
        ({"events": ["task.exploded"]}, "events[0]"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_bad_submission_is_refused_before_anything_is_sent(
    api: TestClient,
    auth: dict[str, str],
    simulator: SimulatorHandle,
    body: dict[str, Any],
    field: str,
) -> None:
    answer = submit(api, auth, **body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["message"].startswith(f"{field}:")
    assert generated(simulator) == 0


def test_a_vendor_error_is_relayed_with_its_status_and_nothing_is_registered(
    api: TestClient, auth: dict[str, str], simulator: SimulatorHandle, session: Session
) -> None:
    simulator.configure(tokens=["someone-else"])
    answer = submit(api, auth)
    assert answer.status_code == 401
    error = answer.json()["error"]
    assert error["code"] == "upstream_rejected"
    assert error["upstream"]["error"]["code"] == "invalid_token"
    assert error["upstream"]["success"] is False
    assert "401" in error["message"]
    assert session.scalar(select(Task)) is None
    session.rollback()  # SQLite: let the API write
    assert generated(simulator) == 1  # sent once, never retried

    simulator.configure(tokens=None, error_500_share=1.0)
    failed = submit(api, auth)
    assert failed.status_code == 500, failed.text
    assert failed.json()["error"]["code"] == "upstream_rejected"
    assert generated(simulator) == 2  # a 5xx is not retried either: it may have spent credits


def test_an_idempotency_key_answers_a_retry_with_the_first_answer(
    api: TestClient, auth: dict[str, str], simulator: SimulatorHandle
) -> None:
    keyed = {**auth, "Idempotency-Key": "order-7-video"}
    body = {"endpoint": "videos", "request": VIDEO}
    first = api.post("/v1/luma/submit", json=body, headers=keyed)
    again = api.post("/v1/luma/submit", json=body, headers=keyed)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert generated(simulator) == 1

    other = api.post(
        "/v1/luma/submit",
        json={"endpoint": "videos", "request": {**VIDEO, "prompt": "another"}},
        headers=keyed,
    )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert generated(simulator) == 1

    # An error is a first answer too: the retry does not spend credits again.
    simulator.configure(tokens=["someone-else"])
    refused = {**auth, "Idempotency-Key": "order-8-video"}
    assert api.post("/v1/luma/submit", json=body, headers=refused).status_code == 401
    simulator.configure(tokens=None)
    replay = api.post("/v1/luma/submit", json=body, headers=refused)
    assert replay.status_code == 401
    assert generated(simulator) == 2


def test_a_submission_uses_the_clients_own_token(
    submit_settings: Settings,
    auth: dict[str, str],
    client: NewClient,
    simulator: SimulatorHandle,
    session: Session,
) -> None:
    from cryptography.fernet import Fernet

    keyed = submit_settings.model_copy(
        update={"secret_key": SecretStr(Fernet.generate_key().decode())}
    )
    set_client_token(session, client.client, "acme-own-token", settings=keyed)
    session.commit()
    simulator.configure(tokens=["acme-own-token"])  # the tracker's token is refused
    answer = submit(TestClient(create_app(keyed)), auth)
    assert answer.status_code == 201, answer.text


def test_without_a_public_url_submit_works_without_the_doorbell_and_says_so_once(
    submit_settings: Settings,
    auth: dict[str, str],
    simulator: SimulatorHandle,
    session: Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain = submit_settings.model_copy(update={"public_url": None})
    with caplog.at_level(logging.WARNING, "tracker.api"), TestClient(create_app(plain)) as api:
        own = {**VIDEO, "callback_url": "https://mine.example/acedata"}
        first = submit(api, auth, request=own)
        second = submit(api, auth)
    assert first.status_code == second.status_code == 201
    task_id = first.json()["task"]["task_id"]
    assert simulator.task(task_id)["record"]["request"] == own  # unchanged
    stored = session.scalar(select(Task).where(Task.task_id == task_id))
    assert stored is not None
    assert stored.doorbell_hash is None
    said = [r for r in caplog.records if "TRACKER_PUBLIC_URL is not set" in r.getMessage()]
    assert len(said) == 1


def _doorbell_token(simulator: SimulatorHandle, task_id: str) -> str:
    url: str = simulator.task(task_id)["record"]["request"]["callback_url"]
    return url.rsplit("/", 1)[1]


def test_the_doorbell_makes_its_task_due_now_and_nothing_else(
    api: TestClient,
    auth: dict[str, str],
    simulator: SimulatorHandle,
    session: Session,
    rung: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    task_id = submit(api, auth).json()["task"]["task_id"]
    other_id = submit(api, auth).json()["task"]["task_id"]
    token = _doorbell_token(simulator, task_id)
    later, lease = utcnow() + timedelta(seconds=30), utcnow() + timedelta(seconds=4)
    session.execute(update(task_schedule_table).values(next_poll_at=later, claimed_until=lease))
    session.commit()

    with caplog.at_level(logging.INFO, "tracker.api"):
        answer = api.post(f"/v1/doorbell/{token}", content=b'{"success": true, "lies": 1}')
        api.app.state.doorbells.flush()  # what its thread does within DOORBELL_WINDOW
    assert answer.status_code == 204
    assert answer.content == b""
    assert token not in caplog.text  # the token rings the task: kept out of the log
    session.expire_all()
    schedule = {
        t.task_id: (t.next_poll_at, t.claimed_until, t.state) for t in session.scalars(select(Task))
    }
    due, claimed, state = schedule[task_id]
    assert due is not None
    assert due <= utcnow()
    assert claimed is None  # an earlier claim's lease does not hold the poll back
    assert state == "pending"  # the body decides nothing
    assert schedule[other_id][:2] == (later, lease)
    session.rollback()  # SQLite: let the API write
    assert len(rung) == 1

    for unknown in ("nope", "x" * 500, token[:-1] + ("A" if token[-1] != "A" else "B")):
        assert api.post(f"/v1/doorbell/{unknown}").status_code == 204
    assert api.post(f"/v1/doorbell/{token}").status_code == 204  # already due: no new ring
    api.app.state.doorbells.flush()
    assert len(rung) == 1


def test_a_flood_of_doorbells_is_rate_limited(submit_settings: Settings, rung: list[int]) -> None:
    limited = TestClient(
        create_app(
            submit_settings.model_copy(update={"doorbell_rps": 3}), poll_doorbell=rung.extend
        )
    )
    statuses = [limited.post("/v1/doorbell/unknown").status_code for _ in range(6)]
    assert statuses[:3] == [204, 204, 204]
    assert 429 in statuses[3:]


def test_a_retry_while_the_first_is_in_flight_is_told_to_wait(
    api: TestClient,
    auth: dict[str, str],
    client: NewClient,
    simulator: SimulatorHandle,
    session: Session,
) -> None:
    from tracker.tracking.submissions import (
        SubmitRequest,
        claim_idempotency_key,
        submission_hash,
    )

    body = {"endpoint": "videos", "request": VIDEO}
    fingerprint = submission_hash("luma", SubmitRequest.model_validate(body))
    claim_idempotency_key(session, client.client, "in-flight", fingerprint, now=utcnow())
    session.commit()
    answer = api.post(
        "/v1/luma/submit", json=body, headers={**auth, "Idempotency-Key": "in-flight"}
    )
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "submission_in_progress"
    assert answer.headers["Retry-After"] == "2"
    assert generated(simulator) == 0


def test_a_rung_registration_is_claimed_alone(
    session: Session, settings: Settings, client: NewClient
) -> None:
    """`poll_now` claims what the doorbell made due, not the ticks' share of due tasks."""
    from tracker.polling import claim_due_tasks
    from tracker.tracking.registration import register_task
    from tracker.tracking.schemas import TaskRegistration

    tasks = [
        register_task(
            session, client.client, TaskRegistration(task_id=f"t{n}"), settings=settings
        ).task
        for n in range(3)
    ]
    session.commit()
    now = utcnow() + timedelta(seconds=1)  # all three are due
    rung = claim_due_tasks(session, now=now, limit=3, settings=settings, row_ids=[tasks[1].id])
    assert [claim.task_id for claim in rung] == ["t1"]
    session.commit()
    rest = claim_due_tasks(session, now=now, limit=10, settings=settings)
    assert sorted(claim.task_id for claim in rest) == ["t0", "t2"]  # t1 is leased
