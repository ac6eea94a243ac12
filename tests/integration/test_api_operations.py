"""The delivery-operations routes through the HTTP API: replay, destinations, the client's
own settings and the defaults registrations take; retention by hand."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from tests.support.history_factory import T0, add_delivery, add_task
from tracker.clock import utcnow
from tracker.db.models import Task, TaskTransition, WebhookAttempt, WebhookDelivery
from tracker.delivery import replay as replay_module
from tracker.tracking.clients import NewClient, create_client
from tracker.tracking.retention import prune_history


def replay(api: TestClient, auth: dict[str, str], **body: object) -> tuple[int, dict[str, object]]:
    answer = api.post("/v1/deliveries/replay", json=body, headers=auth)
    return answer.status_code, answer.json()


def test_replay_sends_again_once_per_delivery_and_only_the_clients_own(
    api: TestClient, auth: dict[str, str], session: Session, client: NewClient, engine: Engine
) -> None:
    other = create_client(session, "other")
    mine = [
        add_delivery(session, add_task(session, client.client, f"t{n}"), status="failed")
        for n in range(3)
    ]
    theirs = add_delivery(session, add_task(session, other.client, "x"), status="failed")
    session.commit()
    since = (T0 - timedelta(days=1)).isoformat()

    assert replay(api, auth, since=since, status="failed") == (202, {"replayed": 3})
    assert replay(api, auth, since=since) == (202, {"replayed": 3})  # idempotent
    with Session(engine) as fresh:
        rows = dict(fresh.execute(select(WebhookDelivery.id, WebhookDelivery.status)).all())
        pending = fresh.scalar(select(func.count()).where(WebhookDelivery.status == "pending"))
    assert {rows[d.id] for d in mine} == {"pending"}
    assert rows[theirs.id] == "failed"
    assert pending == 3  # one pending delivery each, the same ids


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "since"),
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until"),
        ({"since": "yesterday"}, "since"),
        ({"since": "2026-01-01T00:00:00Z", "status": "lost"}, "status"),
    ],
)
def test_replay_bounds_answer_422_naming_the_field(
    api: TestClient, auth: dict[str, str], body: dict[str, object], field: str
) -> None:
    status, answer = replay(api, auth, **body)
    assert status == 422, answer
    assert answer["error"]["message"].startswith(field)  # type: ignore[index]


def test_replay_of_more_than_the_bound_is_refused_whole(
    api: TestClient,
    auth: dict[str, str],
    session: Session,
    client: NewClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replay_module, "MAX_REPLAY", 2)
    for n in range(3):
        add_delivery(session, add_task(session, client.client, f"t{n}"), status="failed")
    session.commit()
    status, answer = replay(api, auth, since="2020-01-01T00:00:00Z")
    assert status == 422
    assert "3 deliveries match" in answer["error"]["message"]  # type: ignore[index]
    assert replay(api, auth, since="2020-01-01T00:00:00Z", task_id="t1") == (
        202,
        {"replayed": 1},
    )


def test_client_settings_are_read_changed_unset_and_vetted(
    api: TestClient, auth: dict[str, str]
) -> None:
    assert api.get("/v1/client", headers=auth).json() == {
        "name": "acme",
        "default_callback_url": None,
        "default_events": None,
        "operations_url": None,
    }
    changed = api.patch(
        "/v1/client",
        json={
            "default_callback_url": "https://hooks.example.com/t",
            "default_events": ["task.failed", "task.completed"],
            "operations_url": "https://ops.example.com/alerts",
        },
        headers=auth,
    )
    assert changed.status_code == 200, changed.json()
    assert changed.json()["default_events"] == ["task.completed", "task.failed"]
    bad = api.patch("/v1/client", json={"operations_url": "ftp://x"}, headers=auth)
    assert bad.status_code == 422
    assert bad.json()["error"]["message"].startswith("operations_url")
    unset = api.patch("/v1/client", json={"operations_url": None}, headers=auth)
    assert unset.json()["operations_url"] is None
    assert unset.json()["default_callback_url"] == "https://hooks.example.com/t"


def test_registrations_without_callback_or_events_take_the_clients_defaults(
    api: TestClient, auth: dict[str, str]
) -> None:
    api.patch(
        "/v1/client",
        json={
            "default_callback_url": "https://hooks.example.com/t",
            "default_events": ["task.failed"],
        },
        headers=auth,
    )
    plain = api.post("/v1/tasks", json={"task_id": "a"}, headers=auth).json()
    assert plain["callback_url"] == "https://hooks.example.com/t"
    assert plain["events"] == ["task.failed"]
    own = api.post(
        "/v1/tasks",
        json={
            "task_id": "b",
            "callback_url": "https://mine.example.com/",
            "events": ["task.completed"],
        },
        headers=auth,
    ).json()
    assert (own["callback_url"], own["events"]) == ("https://mine.example.com/", ["task.completed"])
    none = api.post("/v1/tasks", json={"task_id": "c", "callback_url": None}, headers=auth).json()
    assert none["callback_url"] is None  # an explicit null keeps the task without webhooks
    again = api.post("/v1/tasks", json={"task_id": "a"}, headers=auth)
    assert again.status_code == 200  # the same registration, repeated


def test_destinations_are_listed_and_resumed_per_client(
    api: TestClient, auth: dict[str, str], session: Session, client: NewClient
) -> None:
    from tracker.delivery.destinations import insert_destination

    other = create_client(session, "other")
    insert_destination(session, client.client.id, "https://a.example.com:443", now=utcnow())
    insert_destination(session, other.client.id, "https://b.example.com:443", now=utcnow())
    session.commit()
    (item,) = api.get("/v1/destinations", headers=auth).json()["items"]
    assert item["url"] == "https://a.example.com:443"
    assert item["state"] == "healthy"
    resumed = api.post(f"/v1/destinations/{item['id']}/resume", headers=auth)
    assert resumed.status_code == 200
    theirs = api.post(f"/v1/destinations/{item['id'] + 1}/resume", headers=auth)
    assert theirs.status_code == 404
    assert theirs.json()["error"]["code"] == "destination_not_found"


def test_openapi_documents_every_new_route(api: TestClient) -> None:
    paths = api.get("/openapi.json").json()["paths"]
    assert "post" in paths["/v1/deliveries/replay"]
    assert "get" in paths["/v1/destinations"]
    assert "post" in paths["/v1/destinations/{destination_id}/resume"]
    assert {"get", "patch"} <= set(paths["/v1/client"])


def test_metrics_show_destination_states_and_held_deliveries(api: TestClient) -> None:
    text = api.get("/metrics").text
    assert 'tracker_destinations{state="open"}' in text
    assert "tracker_deliveries_held" in text


def test_prune_removes_old_terminal_history_and_keeps_the_rest(
    engine: Engine, session: Session, client: NewClient
) -> None:
    def task(task_id: str, state: str) -> Task:
        return add_task(
            session, client.client, task_id, created_at=T0, state=state, callback_url=None
        )

    add_delivery(session, task("old", "completed"), status="succeeded", attempt_codes=(200,))
    add_delivery(session, task("waiting", "failed"), status="pending", attempt_codes=(500,))
    task("active", "running")
    session.commit()
    now = T0 + timedelta(days=40)
    dry = prune_history(engine, older_than=timedelta(days=30), now=now, dry_run=True)
    assert (dry.tasks, dry.deliveries, dry.attempts) == (1, 1, 1)
    pruned = prune_history(engine, older_than=timedelta(days=30), now=now, batch=1)
    assert (pruned.tasks, pruned.transitions, pruned.deliveries, pruned.attempts) == (1, 3, 1, 1)
    with Session(engine) as fresh:
        assert sorted(fresh.scalars(select(Task.task_id))) == ["active", "waiting"]
        assert fresh.scalar(select(func.count()).select_from(WebhookAttempt)) == 1
        assert (
            fresh.scalar(select(func.count()).select_from(TaskTransition)) == 5
        )  # waiting: 3, active: 2
