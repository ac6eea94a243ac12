"""`/v1/tasks`: registration (single and batch), listing, one task, cancelling; tenancy."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.support.history_factory import T0, add_delivery, add_task
from tracker.config import Settings
from tracker.db.models import Task, WebhookDelivery
from tracker.tracking.clients import NewClient, create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration

HOOK = "https://hooks.example.com/tracker"


@pytest.fixture
def other(session: Session) -> NewClient:
    """A second client, whose tasks the `client` fixture must never see."""
    new = create_client(session, "globex")
    session.commit()
    return new


def error_of(response: Any) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error", "trace_id"}
    assert body["trace_id"] == response.headers["x-trace-id"]
    assert set(body["error"]) == {"code", "message"}
    return dict(body["error"])


def test_registering_a_task_answers_201_with_the_task(
    api: TestClient, auth: dict[str, str], settings: Settings
) -> None:
    answer = api.post(
        "/v1/tasks",
        json={"task_id": "abc-1", "callback_url": HOOK, "metadata": {"order": 7}},
        headers=auth,
    )

    assert answer.status_code == 201
    task = answer.json()
    assert set(task) == {
        "task_id", "service", "state", "upstream_state", "callback_url", "metadata", "events",
        "created_at", "updated_at", "finished_at", "deadline_at", "polls", "failure", "record",
        "progress", "outputs", "profile",
    }  # fmt: skip
    assert task["service"] == "luma"
    assert task["state"] == "pending"
    assert task["metadata"] == {"order": 7}
    assert task["events"] == ["task.completed", "task.failed", "task.timed_out"]
    assert task["created_at"].endswith("Z")
    created = datetime.fromisoformat(task["created_at"])
    deadline = datetime.fromisoformat(task["deadline_at"])
    assert deadline - created == timedelta(seconds=settings.task_timeout)
    assert (task["failure"], task["record"], task["finished_at"]) == (None, None, None)
    assert (task["progress"], task["outputs"], task["profile"]) == (None, [], "luma")


def test_the_same_registration_again_answers_200_and_other_settings_409(
    api: TestClient, auth: dict[str, str]
) -> None:
    body = {"task_id": "abc-1", "callback_url": HOOK}
    first = api.post("/v1/tasks", json=body, headers=auth)
    again = api.post("/v1/tasks", json=body, headers=auth)
    changed = api.post("/v1/tasks", json={**body, "callback_url": HOOK + "/v2"}, headers=auth)

    assert (first.status_code, again.status_code, changed.status_code) == (201, 200, 409)
    assert again.json() == first.json()
    error = error_of(changed)
    assert error["code"] == "registration_conflict"
    assert "abc-1" in error["message"]


def test_a_task_ended_by_cancelling_cannot_be_registered_with_other_settings(
    api: TestClient, auth: dict[str, str]
) -> None:
    api.post("/v1/tasks", json={"task_id": "abc-1"}, headers=auth)
    api.delete("/v1/tasks/abc-1", headers=auth)

    answer = api.post("/v1/tasks", json={"task_id": "abc-1", "callback_url": HOOK}, headers=auth)

    assert answer.status_code == 409
    assert "cancelled" in error_of(answer)["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "task_id"),
        ({"task_id": ""}, "task_id"),
        ({"task_id": "has space"}, "task_id"),
        ({"task_id": "x" * 129}, "task_id"),
        ({"task_id": 12}, "task_id"),
        ({"task_id": "a", "service": "Luma"}, "service"),
        ({"task_id": "a", "service": "x" * 33}, "service"),
        ({"task_id": "a", "callback_url": "ftp://x"}, "callback_url"),
        ({"task_id": "a", "callback_url": "/relative"}, "callback_url"),
        ({"task_id": "a", "callback_url": "https://" + "h" * 2048}, "callback_url"),
        ({"task_id": "a", "callback_url": "https://x.example/a b"}, "callback_url"),
        ({"task_id": "a", "callback_url": "https://x.example/\x00"}, "callback_url"),
        ({"task_id": "a", "callback_url": "https://x.example:99999/"}, "callback_url"),
        ({"task_id": "a", "metadata": [1]}, "metadata"),
        ({"task_id": "a", "metadata": {"blob": "x" * 16400}}, "metadata"),
        ({"task_id": "a", "metadata": {"nul": "a\x00b"}}, "metadata"),
        ({"task_id": "a", "events": ["task.started"]}, "events[0]"),
        ({"task_id": "a", "events": "task.completed"}, "events"),
        ({"task_id": "a", "timeout_seconds": 0}, "timeout_seconds"),
        ({"task_id": "a", "timeout_seconds": 7 * 86400 + 1}, "timeout_seconds"),
        ({"task_id": "a", "timeout_seconds": 1.5}, "timeout_seconds"),
        ({"task_id": "a", "colour": "blue"}, "colour"),
    ],
)
def test_each_invalid_field_answers_422_naming_it(
    api: TestClient, auth: dict[str, str], body: dict[str, Any], field: str
) -> None:
    answer = api.post("/v1/tasks", json=body, headers=auth)

    assert answer.status_code == 422
    error = error_of(answer)
    assert error["code"] == "validation_error"
    assert error["message"].startswith(f"{field}: ")


def test_metadata_with_nan_is_refused(api: TestClient, auth: dict[str, str]) -> None:
    """Python's JSON reads NaN; the database and every receiver would not."""
    answer = api.post(
        "/v1/tasks",
        content=b'{"task_id": "a", "metadata": {"ratio": NaN}}',
        headers={**auth, "content-type": "application/json"},
    )

    assert answer.status_code == 422
    assert error_of(answer)["message"].startswith("metadata: must be strict JSON")


def test_a_batch_answers_one_result_per_item_in_order(
    api: TestClient, auth: dict[str, str]
) -> None:
    api.post("/v1/tasks", json={"task_id": "known", "callback_url": HOOK}, headers=auth)
    tasks = [
        {"task_id": "new-1"},
        {"task_id": "known", "callback_url": HOOK},
        {"task_id": "known", "callback_url": HOOK + "/other"},
        {"task_id": "bad", "callback_url": "ftp://x"},
        "not an object",
        {"task_id": "new-2", "service": "kling"},
        {"task_id": "new-1"},
    ]

    answer = api.post("/v1/tasks/batch", json={"tasks": tasks}, headers=auth)

    assert answer.status_code == 200
    items = answer.json()["items"]
    assert [item["status"] for item in items] == [201, 200, 409, 422, 422, 201, 200]
    assert items[0]["task"]["task_id"] == "new-1"
    assert items[2]["error"]["code"] == "registration_conflict"
    assert items[3]["error"] == {
        "code": "validation_error",
        "message": "tasks[3].callback_url: must be an absolute http:// or https:// URL with a "
        "host (got 'ftp://x')",
    }
    assert items[4]["error"]["message"].startswith("tasks[4]: must be a JSON object")
    listed = api.get("/v1/tasks", headers=auth).json()["items"]
    assert sorted(t["task_id"] for t in listed) == ["known", "new-1", "new-2"]


def test_a_batch_of_1000_registers_all_and_1001_is_refused(
    api: TestClient, auth: dict[str, str]
) -> None:
    tasks = [{"task_id": f"t-{n}", "callback_url": HOOK} for n in range(1001)]

    too_many = api.post("/v1/tasks/batch", json={"tasks": tasks}, headers=auth)
    full = api.post("/v1/tasks/batch", json={"tasks": tasks[:1000]}, headers=auth)

    assert too_many.status_code == 422
    assert error_of(too_many)["message"].startswith("tasks: ")
    assert full.status_code == 200
    assert [item["status"] for item in full.json()["items"]] == [201] * 1000


@pytest.mark.parametrize(
    ("body", "field"),
    [({}, "tasks"), ({"tasks": {"task_id": "a"}}, "tasks"), ({"tasks": [], "x": 1}, "x")],
)
def test_a_malformed_batch_answers_422_naming_the_field(
    api: TestClient, auth: dict[str, str], body: dict[str, Any], field: str
) -> None:
    answer = api.post("/v1/tasks/batch", json=body, headers=auth)

    assert answer.status_code == 422
    assert error_of(answer)["message"].startswith(f"{field}: ")


def test_concurrent_registrations_of_one_task_answer_created_once(
    engine: Engine, client: NewClient, settings: Settings
) -> None:
    """The loser of the race on the unique constraint answers as a repeat, not an error."""
    registration = TaskRegistration(task_id="race", callback_url=HOOK)
    results: list[bool] = []
    first_inserted = threading.Event()
    release_first = threading.Event()

    def register(wait: bool) -> None:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            if not wait:
                # Make sure the other registration has looked and found nothing yet.
                first_inserted.wait(5)
            results.append(
                register_task(session, client.client, registration, settings=settings).created
            )
            if wait:
                first_inserted.set()
                release_first.wait(0.5)

    threads = [threading.Thread(target=register, args=(flag,)) for flag in (True, False)]
    for thread in threads:
        thread.start()
    release_first.set()
    for thread in threads:
        thread.join(10)

    assert sorted(results) == [False, True]


def test_a_burst_beyond_the_request_threads_and_the_pool_is_answered_in_full(
    settings: Settings, auth: dict[str, str]
) -> None:
    """Sixty registrations at once, against 3 request threads and a pool of 5 (+10):
    a request holds a connection only within one hop to a thread. Held across hops
    (the key's lookup, then the route), requests holding every connection waited for
    a thread, while the threads waited for a connection, until the pool's 30 s timeout."""
    from tracker.api import create_app

    statuses: dict[int, int] = {}

    def register(n: int) -> None:
        body = {"task_id": f"burst-{n}", "callback_url": HOOK}
        statuses[n] = api.post("/v1/tasks", json=body, headers=auth).status_code

    api = TestClient(create_app(settings)).__enter__()
    # Daemon threads: stuck ones must not keep the test run from ending.
    senders = [threading.Thread(target=register, args=(n,), daemon=True) for n in range(60)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 20
    for sender in senders:
        sender.join(max(0.0, deadline - time.monotonic()))
    assert len(statuses) == 60, f"{60 - len(statuses)} of 60 registrations got no answer in 20 s"
    api.__exit__(None, None, None)
    assert sorted(statuses.values()) == [201] * 60


def seed_listing(session: Session, client: NewClient) -> list[Task]:
    """Nine tasks a minute apart, of two services and several states."""
    plan = [
        ("luma", "pending"), ("luma", "running"), ("kling", "completed"), ("luma", "completed"),
        ("luma", "failed"), ("kling", "pending"), ("luma", "completed"), ("kling", "completed"),
        ("luma", "pending"),
    ]  # fmt: skip
    tasks = [
        add_task(
            session,
            client.client,
            f"t{n}",
            service=service,
            state=state,
            created_at=T0 + timedelta(minutes=n),
        )
        for n, (service, state) in enumerate(plan)
    ]
    session.commit()
    return tasks


def list_all(api: TestClient, auth: dict[str, str], **params: Any) -> tuple[list[str], int]:
    """Task ids over every page of `GET /v1/tasks`, and the number of pages."""
    ids: list[str] = []
    pages = 0
    cursor = None
    while True:
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        answer = api.get("/v1/tasks", params=query, headers=auth)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        ids += [task["task_id"] for task in body["items"]]
        pages += 1
        if body["next_cursor"] is None:
            return ids, pages
        cursor = body["next_cursor"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, ["t8", "t7", "t6", "t5", "t4", "t3", "t2", "t1", "t0"]),
        ({"state": "completed"}, ["t7", "t6", "t3", "t2"]),
        ({"service": "kling"}, ["t7", "t5", "t2"]),
        ({"state": "completed", "service": "luma"}, ["t6", "t3"]),
        ({"created_after": "2026-01-01T00:04:00Z"}, ["t8", "t7", "t6", "t5"]),
        ({"created_before": "2026-01-01T01:04:00+01:00"}, ["t3", "t2", "t1", "t0"]),
        ({"created_after": "2026-01-01T00:00:00Z", "created_before": "2026-01-01T00:04:00Z"},
         ["t3", "t2", "t1"]),
    ],
)  # fmt: skip
def test_listing_pages_newest_first_with_each_filter(
    api: TestClient,
    auth: dict[str, str],
    session: Session,
    client: NewClient,
    params: dict[str, str],
    expected: list[str],
) -> None:
    seed_listing(session, client)

    ids, pages = list_all(api, auth, **params)

    assert ids == expected
    assert pages == (len(expected) + 1) // 2


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": -3}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "99999999999999999999999"}, "limit"),
        ({"state": "done"}, "state"),
        ({"service": "Not A Service"}, "service"),
        ({"service": "\x00"}, "service"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_before": "2026-13-45"}, "created_before"),
        ({"created_after": "2026-01-01T00:00:00"}, "created_after"),  # no zone
        ({"created_after": "0.5"}, "created_after"),  # not a Unix time either
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "x" * 600}, "cursor"),
    ],
)
def test_bad_listing_parameters_answer_422_naming_them(
    api: TestClient, auth: dict[str, str], params: dict[str, Any], field: str
) -> None:
    answer = api.get("/v1/tasks", params=params, headers=auth)

    assert answer.status_code == 422
    assert error_of(answer)["message"].startswith(f"{field}: ")


def test_one_task_shows_its_history_and_webhooks(
    api: TestClient, auth: dict[str, str], session: Session, client: NewClient
) -> None:
    add_task(session, client.client, "t1", service="kling", state="failed", created_at=T0)
    session.commit()

    answer = api.get("/v1/tasks/t1", params={"service": "kling"}, headers=auth)
    default_service = api.get("/v1/tasks/t1", headers=auth)

    assert answer.status_code == 200
    task = answer.json()
    assert task["failure"] == {"code": "content_policy", "message": "prompt refused"}
    assert [t["to_state"] for t in task["transitions"]] == ["pending", "running", "failed"]
    assert [(d["event"], d["status"]) for d in task["deliveries"]] == [("task.failed", "pending")]
    assert default_service.status_code == 404
    assert error_of(default_service)["code"] == "task_not_found"


def test_cancelling_stops_tracking_keeps_history_and_supersedes_a_running_webhook(
    api: TestClient, auth: dict[str, str], session: Session, client: NewClient, engine: Engine
) -> None:
    events = ["task.running", "task.completed", "task.failed", "task.timed_out"]
    task = add_task(session, client.client, "t1", state="running", created_at=T0, events=events)
    running = add_delivery(session, task, event="task.running", created_at=T0)
    session.commit()

    answer = api.delete("/v1/tasks/t1", headers=auth)
    again = api.delete("/v1/tasks/t1", headers=auth)

    assert answer.status_code == 200
    assert answer.json()["state"] == "cancelled"
    assert answer.json()["finished_at"] is not None
    assert again.status_code == 200
    shown = api.get("/v1/tasks/t1", headers=auth).json()
    assert [t["to_state"] for t in shown["transitions"]] == ["pending", "running", "cancelled"]
    with Session(engine) as check:
        assert check.get(WebhookDelivery, running.id).status == "superseded"  # type: ignore[union-attr]
        assert check.scalar(select(Task.next_poll_at).where(Task.task_id == "t1")) is None


def test_cancelling_an_unknown_task_answers_404(api: TestClient, auth: dict[str, str]) -> None:
    answer = api.delete("/v1/tasks/nope", params={"service": "suno"}, headers=auth)

    assert answer.status_code == 404
    assert error_of(answer)["code"] == "task_not_found"


def test_another_clients_task_is_invisible_and_untouchable(
    api: TestClient,
    auth: dict[str, str],
    session: Session,
    client: NewClient,
    other: NewClient,
    engine: Engine,
) -> None:
    add_task(session, other.client, "theirs", created_at=T0)
    session.commit()

    read = api.get("/v1/tasks/theirs", headers=auth)
    cancel = api.delete("/v1/tasks/theirs", headers=auth)
    listed = api.get("/v1/tasks", headers=auth)
    registered = api.post("/v1/tasks", json={"task_id": "theirs"}, headers=auth)

    assert (read.status_code, cancel.status_code) == (404, 404)
    assert error_of(read) | {"message": ""} == {"code": "task_not_found", "message": ""}
    assert listed.json() == {"items": [], "next_cursor": None}
    # The same upstream id is a separate registration for this client.
    assert registered.status_code == 201
    with Session(engine) as check:
        states = check.scalars(select(Task.state).where(Task.client_id == other.client.id))
        assert list(states) == ["pending"]
