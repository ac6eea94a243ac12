"""`/v1/deliveries`: listing with paging and filters, one delivery with attempts, manual retry."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.support.history_factory import T0, add_delivery, add_task
from tracker.db.models import WebhookDelivery
from tracker.tracking.clients import NewClient, create_client


@pytest.fixture
def other(session: Session) -> NewClient:
    new = create_client(session, "globex")
    session.commit()
    return new


def error_of(response: Any) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error", "trace_id"}
    assert body["trace_id"] == response.headers["x-trace-id"]
    return dict(body["error"])


def seed(session: Session, client: NewClient) -> list[WebhookDelivery]:
    """Seven deliveries a minute apart over two tasks; statuses vary."""
    first = add_task(session, client.client, "first", created_at=T0)
    second = add_task(session, client.client, "second", service="kling", created_at=T0)
    statuses = ["succeeded", "failed", "pending", "succeeded", "failed", "superseded", "pending"]
    made = [
        add_delivery(
            session,
            first if n % 2 == 0 else second,
            status=status,
            created_at=T0 + timedelta(minutes=n),
            attempt_codes=(500, 200) if status == "succeeded" else (),
        )
        for n, status in enumerate(statuses)
    ]
    session.commit()
    return made


def list_all(api: TestClient, auth: dict[str, str], **params: Any) -> tuple[list[str], int]:
    ids: list[str] = []
    pages = 0
    cursor = None
    while True:
        query = {**params, "limit": 2, **({"cursor": cursor} if cursor else {})}
        answer = api.get("/v1/deliveries", params=query, headers=auth)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        ids += [delivery["id"] for delivery in body["items"]]
        pages += 1
        if body["next_cursor"] is None:
            return ids, pages
        cursor = body["next_cursor"]


@pytest.mark.parametrize(
    ("params", "picked"),
    [
        ({}, [6, 5, 4, 3, 2, 1, 0]),
        ({"status": "failed"}, [4, 1]),
        ({"status": "pending"}, [6, 2]),
        ({"task_id": "first"}, [6, 4, 2, 0]),
        ({"task_id": "second", "status": "succeeded"}, [3]),
        ({"task_id": "unknown"}, []),
    ],
)
def test_listing_pages_newest_first_with_each_filter(
    api: TestClient,
    auth: dict[str, str],
    session: Session,
    client: NewClient,
    params: dict[str, str],
    picked: list[int],
) -> None:
    made = seed(session, client)

    ids, pages = list_all(api, auth, **params)

    assert ids == [made[n].id for n in picked]
    assert pages == max(1, (len(picked) + 1) // 2)


def test_a_listed_delivery_names_its_task(
    api: TestClient, auth: dict[str, str], session: Session, client: NewClient
) -> None:
    made = seed(session, client)

    item = api.get("/v1/deliveries", params={"limit": 1}, headers=auth).json()["items"][0]

    assert item == {
        "id": made[6].id,
        "event": "task.completed",
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": "2026-01-01T00:06:00.000000Z",
        "delivered_at": None,
        "last_status_code": None,
        "failure": None,
        "task_id": "first",
        "service": "luma",
        "callback_url": "https://hooks.example.com/tracker",
        "created_at": "2026-01-01T00:06:00.000000Z",
        "updated_at": "2026-01-01T00:06:00.000000Z",
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"status": "delivered"}, "status"),
        ({"task_id": "a b"}, "task_id"),
        ({"limit": 0}, "limit"),
        ({"limit": 1000}, "limit"),
        ({"cursor": "%%%"}, "cursor"),
    ],
)
def test_bad_listing_parameters_answer_422_naming_them(
    api: TestClient, auth: dict[str, str], params: dict[str, Any], field: str
) -> None:
    answer = api.get("/v1/deliveries", params=params, headers=auth)

    assert answer.status_code == 422
    assert error_of(answer)["message"].startswith(f"{field}: ")


def test_a_task_listing_cursor_does_not_page_deliveries(
    api: TestClient, auth: dict[str, str], session: Session, client: NewClient
) -> None:
    for n in range(3):
        add_task(session, client.client, f"t{n}", created_at=T0 + timedelta(minutes=n))
    session.commit()
    cursor = api.get("/v1/tasks", params={"limit": 1}, headers=auth).json()["next_cursor"]

    answer = api.get("/v1/deliveries", params={"cursor": cursor}, headers=auth)

    assert answer.status_code == 422
    assert error_of(answer)["code"] == "invalid_cursor"


def test_one_delivery_shows_its_payload_and_every_attempt(
    api: TestClient, auth: dict[str, str], session: Session, client: NewClient
) -> None:
    task = add_task(session, client.client, "t1", created_at=T0)
    delivery = add_delivery(session, task, status="failed", attempt_codes=(503, None, 500))
    session.commit()

    answer = api.get(f"/v1/deliveries/{delivery.id}", headers=auth)

    assert answer.status_code == 200
    body = answer.json()
    assert body["attempt_count"] == 3
    assert body["status"] == "failed"
    assert body["last_status_code"] == 500
    assert body["payload"]["type"] == "task.completed"
    assert body["payload"]["data"]["task_id"] == "t1"
    assert [a["status_code"] for a in body["attempts"]] == [503, None, 500]
    assert body["attempts"][0] == {
        "attempt": 1,
        "started_at": "2026-01-01T00:00:01.000000Z",
        "duration_ms": 12,
        "status_code": 503,
        "response_excerpt": "answer 503",
        "error": None,
    }


def test_an_unknown_delivery_answers_404(api: TestClient, auth: dict[str, str]) -> None:
    shown = api.get("/v1/deliveries/msg_nothing", headers=auth)
    retried = api.post("/v1/deliveries/msg_nothing/retry", headers=auth)

    assert (shown.status_code, retried.status_code) == (404, 404)
    assert error_of(shown)["code"] == error_of(retried)["code"] == "delivery_not_found"


def test_a_bad_delivery_id_answers_422(api: TestClient, auth: dict[str, str]) -> None:
    answer = api.get("/v1/deliveries/bad%00id", headers=auth)

    assert answer.status_code == 422
    assert error_of(answer)["message"].startswith("delivery_id: ")


def test_retrying_a_failed_delivery_makes_it_due_again_with_the_same_id(
    api: TestClient, auth: dict[str, str], session: Session, client: NewClient, engine: Engine
) -> None:
    task = add_task(session, client.client, "t1", created_at=T0)
    delivery = add_delivery(session, task, status="failed", attempt_codes=(500,) * 8)
    session.commit()

    answer = api.post(f"/v1/deliveries/{delivery.id}/retry", headers=auth)

    assert answer.status_code == 202
    body = answer.json()
    assert body["id"] == delivery.id
    assert body["status"] == "pending"
    assert body["next_attempt_at"] is not None
    assert body["attempt_count"] == 8
    with Session(engine) as check:
        stored = check.get(WebhookDelivery, delivery.id)
        assert stored is not None
        assert stored.status == "pending"


def test_retrying_a_superseded_delivery_answers_409(
    api: TestClient, auth: dict[str, str], session: Session, client: NewClient
) -> None:
    task = add_task(session, client.client, "t1", created_at=T0)
    delivery = add_delivery(session, task, status="superseded", event="task.running")
    session.commit()

    answer = api.post(f"/v1/deliveries/{delivery.id}/retry", headers=auth)

    assert answer.status_code == 409
    assert error_of(answer)["code"] == "delivery_superseded"


def test_another_clients_deliveries_are_invisible_and_cannot_be_retried(
    api: TestClient,
    auth: dict[str, str],
    session: Session,
    other: NewClient,
    engine: Engine,
) -> None:
    task = add_task(session, other.client, "theirs", created_at=T0)
    delivery = add_delivery(session, task, status="failed", attempt_codes=(500,))
    session.commit()

    shown = api.get(f"/v1/deliveries/{delivery.id}", headers=auth)
    retried = api.post(f"/v1/deliveries/{delivery.id}/retry", headers=auth)
    listed = api.get("/v1/deliveries", headers=auth)
    by_task = api.get("/v1/deliveries", params={"task_id": "theirs"}, headers=auth)

    assert (shown.status_code, retried.status_code) == (404, 404)
    assert listed.json() == by_task.json() == {"items": [], "next_cursor": None}
    with Session(engine) as check:
        stored = check.get(WebhookDelivery, delivery.id)
        assert stored is not None
        assert stored.status == "failed"
