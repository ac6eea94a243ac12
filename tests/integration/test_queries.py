"""The read side: keyset pages, filters, tenancy, cursors and the resource shapes."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from tests.support.history_factory import T0, add_delivery, add_task
from tracker.db.models import WebhookDelivery
from tracker.db.queries import (
    DELIVERIES_CURSOR_PATTERN,
    DELIVERIES_LISTING,
    TASKS_CURSOR_PATTERN,
    TASKS_LISTING,
    Page,
    Position,
    decode_cursor,
    delivery_detail,
    encode_cursor,
    get_delivery,
    get_task,
    list_deliveries,
    list_tasks,
    task_detail,
)
from tracker.errors import DeliveryNotFound, InvalidCursor, InvalidQuery, TaskNotFound
from tracker.tracking.clients import NewClient, create_client


def _b64(value: Any) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def all_pages(fetch: Any, **filters: Any) -> tuple[list[Any], int]:
    """Every row of a listing, page by page; and the number of pages."""
    rows: list[Any] = []
    cursor, pages = None, 0
    while True:
        page: Page[Any] = fetch(cursor=cursor, **filters)
        rows += page.items
        pages += 1
        if page.next_cursor is None:
            return rows, pages
        cursor = page.next_cursor


@pytest.fixture
def other(session: Session) -> NewClient:
    new = create_client(session, "globex")
    session.commit()
    return new


def test_cursor_round_trip() -> None:
    position = Position(T0 + timedelta(microseconds=7), 42)
    assert decode_cursor(TASKS_LISTING, encode_cursor(TASKS_LISTING, position)) == position


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "abc",
        "!!!!",
        _b64(b"\xff\xfe not json"),
        _b64([1, 2]),
        _b64({"l": "tasks", "t": "2026-01-01T00:00:00+00:00"}),
        _b64({"l": "deliveries", "t": "2026-01-01T00:00:00+00:00", "i": 1}),
        _b64({"l": "tasks", "t": "2026-01-01T00:00:00", "i": 1}),
        _b64({"l": "tasks", "t": "yesterday", "i": 1}),
        _b64({"l": "tasks", "t": 5, "i": 1}),
        _b64({"l": "tasks", "t": "2026-01-01T00:00:00Z", "i": True}),
        _b64({"l": "tasks", "t": "2026-01-01T00:00:00Z", "i": 2**63}),
        _b64({"l": "tasks", "t": "2026-01-01T00:00:00Z", "i": -1}),
        _b64({"l": "tasks", "t": "2026-01-01T00:00:00Z", "i": "msg_1"}),
        "A" * 600,
        "d~1725077566241000~msg_1",  # a deliveries cursor
        "t~1725077566241000~msg_1",
        "t~12345678901234567~1",  # beyond the year 2286
        "t~1~1234567890123456789",  # beyond BIGINT's reach
        "t~-1~1",
        "t~1~1\n",
        "T~1~1",
    ],
)
def test_a_cursor_not_made_by_the_listing_is_refused_naming_the_parameter(cursor: str) -> None:
    with pytest.raises(InvalidCursor, match=r"^cursor: "):
        decode_cursor(TASKS_LISTING, cursor)


@hypothesis.settings(max_examples=200, deadline=None, database=None)
@hypothesis.given(
    tasks=st.from_regex(TASKS_CURSOR_PATTERN, fullmatch=True),
    deliveries=st.from_regex(DELIVERIES_CURSOR_PATTERN, fullmatch=True),
)
def test_every_string_of_the_documented_cursor_form_is_a_position(
    tasks: str, deliveries: str
) -> None:
    """The API states these patterns in its OpenAPI document: a client keeping to them is
    never refused."""
    assert decode_cursor(TASKS_LISTING, tasks).created_at.tzinfo is not None
    assert isinstance(decode_cursor(DELIVERIES_LISTING, deliveries).row_id, str)


def test_a_delivery_cursor_carries_a_string_id() -> None:
    position = Position(T0, "msg_abc")
    assert (
        decode_cursor(DELIVERIES_LISTING, encode_cursor(DELIVERIES_LISTING, position)) == position
    )


def test_tasks_page_newest_first_with_ties_broken_by_id(
    session: Session, client: NewClient
) -> None:
    # Three tasks share one creation time: the id decides, and no row repeats or goes missing.
    times = [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1), T0 + timedelta(seconds=1)]
    times += [T0 + timedelta(seconds=s) for s in (2, 3, 5)]
    for number, moment in enumerate(times):
        add_task(session, client.client, f"t{number}", created_at=moment)
    session.commit()

    rows, pages = all_pages(
        lambda **kw: list_tasks(session, client_id=client.client.id, limit=2, **kw)
    )

    expected = sorted(rows, key=lambda t: (t.created_at, t.id), reverse=True)
    assert [t.id for t in rows] == [t.id for t in expected]
    assert len({t.id for t in rows}) == len(times)
    assert pages == 4


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"state": "completed"}, {"done1", "done2"}),
        ({"service": "kling"}, {"kling1", "kling2"}),
        ({"created_after": T0 + timedelta(minutes=2)}, {"kling1", "kling2"}),
        ({"created_before": T0 + timedelta(minutes=2)}, {"run1", "done1"}),
        (
            {
                "created_after": T0 + timedelta(minutes=1),
                "created_before": T0 + timedelta(minutes=4),
            },
            {"done2", "kling1"},
        ),
        ({"state": "running", "service": "luma"}, {"run1"}),
    ],
)
def test_filters_hold_across_pages(
    session: Session, client: NewClient, filters: dict[str, Any], expected: set[str]
) -> None:
    """`created_after` and `created_before` are exclusive bounds."""
    for minute, (task_id, service, state) in enumerate(
        [
            ("run1", "luma", "running"),
            ("done1", "luma", "completed"),
            ("done2", "luma", "completed"),
            ("kling1", "kling", "pending"),
            ("kling2", "kling", "failed"),
        ]
    ):
        add_task(
            session,
            client.client,
            task_id,
            service=service,
            state=state,
            created_at=T0 + timedelta(minutes=minute),
        )
    session.commit()

    rows, _ = all_pages(
        lambda **kw: list_tasks(session, client_id=client.client.id, limit=1, **kw), **filters
    )

    assert {t.task_id for t in rows} == expected


def test_a_time_without_zone_is_taken_as_utc(session: Session, client: NewClient) -> None:
    add_task(session, client.client, "early", created_at=T0)
    add_task(session, client.client, "late", created_at=T0 + timedelta(hours=1))
    session.commit()

    page = list_tasks(session, client_id=client.client.id, created_after=T0.replace(tzinfo=None))

    assert [t.task_id for t in page.items] == ["late"]


@pytest.mark.parametrize("limit", [0, -1, 501])
def test_a_limit_out_of_range_is_refused(session: Session, client: NewClient, limit: int) -> None:
    with pytest.raises(InvalidQuery, match=r"^limit: must be between 1 and 500"):
        list_tasks(session, client_id=client.client.id, limit=limit)


def test_listings_are_scoped_to_the_client_unless_none(
    session: Session, client: NewClient, other: NewClient
) -> None:
    add_task(session, client.client, "mine", created_at=T0)
    theirs = add_task(session, other.client, "theirs", created_at=T0)
    add_delivery(session, theirs, created_at=T0)
    session.commit()

    assert [t.task_id for t in list_tasks(session, client_id=client.client.id).items] == ["mine"]
    assert {t.task_id for t in list_tasks(session, client_id=None).items} == {"mine", "theirs"}
    assert list_deliveries(session, client_id=client.client.id).items == []
    assert len(list_deliveries(session, client_id=None).items) == 1
    with pytest.raises(TaskNotFound):
        get_task(session, "theirs", service="luma", client_id=client.client.id)


def test_a_task_shows_transitions_oldest_first_and_its_deliveries(
    session: Session, client: NewClient
) -> None:
    task = add_task(session, client.client, "t1", state="completed", created_at=T0)
    session.commit()

    detail = task_detail(get_task(session, "t1", service="luma", client_id=client.client.id))

    assert [(s["from_state"], s["to_state"]) for s in detail["transitions"]] == [
        (None, "pending"),
        ("pending", "running"),
        ("running", "completed"),
    ]
    assert detail["transitions"][1] == {
        "from_state": "pending",
        "to_state": "running",
        "upstream_state": "processing",
        "observed_at": "2026-01-01T00:01:00.000000Z",
    }
    assert [d["event"] for d in detail["deliveries"]] == ["task.completed"]
    assert set(detail["deliveries"][0]) == {
        "id",
        "event",
        "status",
        "attempts",
        "next_attempt_at",
        "delivered_at",
        "last_status_code",
        "failure",
    }
    assert detail["created_at"] == "2026-01-01T00:00:00.000000Z"
    assert detail["finished_at"] == "2026-01-01T00:02:00.000000Z"
    assert detail["state"] == task.state == "completed"


def test_deliveries_page_and_filter_by_status_and_task(session: Session, client: NewClient) -> None:
    first = add_task(session, client.client, "first", created_at=T0)
    second = add_task(session, client.client, "second", created_at=T0)
    made: list[WebhookDelivery] = []
    for minute in range(5):
        task = first if minute % 2 == 0 else second
        status = "failed" if minute in (1, 4) else "succeeded"
        made.append(
            add_delivery(session, task, status=status, created_at=T0 + timedelta(minutes=minute))
        )
    session.commit()

    def fetch(**kw: Any) -> Page[WebhookDelivery]:
        return list_deliveries(session, client_id=client.client.id, limit=2, **kw)

    everything, pages = all_pages(fetch)
    assert [d.id for d in everything] == [d.id for d in reversed(made)]
    assert pages == 3
    failed, _ = all_pages(fetch, status="failed")
    assert [d.id for d in failed] == [made[4].id, made[1].id]
    of_first, _ = all_pages(fetch, task_id="first")
    assert [d.id for d in of_first] == [made[4].id, made[2].id, made[0].id]
    assert all_pages(fetch, task_id="nope")[0] == []


def test_a_delivery_shows_its_payload_and_every_attempt(
    session: Session, client: NewClient, other: NewClient
) -> None:
    task = add_task(session, client.client, "t1", created_at=T0)
    delivery = add_delivery(session, task, status="failed", attempt_codes=(500, None, 503))
    session.commit()
    session.expunge_all()

    detail = delivery_detail(get_delivery(session, delivery.id, client_id=client.client.id))

    assert detail["attempt_count"] == 3
    assert [a["attempt"] for a in detail["attempts"]] == [1, 2, 3]
    assert detail["attempts"][1] == {
        "attempt": 2,
        "started_at": "2026-01-01T00:00:02.000000Z",
        "duration_ms": 24,
        "status_code": None,
        "response_excerpt": None,
        "error": "connection refused",
    }
    assert detail["payload"]["type"] == "task.completed"
    assert detail["payload"]["data"]["task_id"] == "t1"
    assert detail["failure"] == {"code": "gave_up", "message": "no 2xx after every attempt"}
    assert (detail["task_id"], detail["service"]) == ("t1", "luma")
    with pytest.raises(DeliveryNotFound):
        get_delivery(session, delivery.id, client_id=other.client.id)


@pytest.fixture
def statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every SQL statement the engine runs during the test, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def remember(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", remember)
    yield seen
    event.remove(engine, "before_cursor_execute", remember)


def test_deep_pages_use_the_keyset_never_offset(
    session: Session, client: NewClient, statements: list[tuple[str, Any]]
) -> None:
    """SQLite's dialect always writes `OFFSET ?`; its value must be 0 there."""
    tasks = [
        add_task(session, client.client, f"t{number}", created_at=T0 + timedelta(seconds=number))
        for number in range(6)
    ]
    for task in tasks:
        add_delivery(session, task, created_at=task.created_at)
    session.commit()

    all_pages(lambda **kw: list_tasks(session, client_id=client.client.id, limit=2, **kw))
    all_pages(lambda **kw: list_deliveries(session, client_id=client.client.id, limit=2, **kw))

    listing = [(sql, params) for sql, params in statements if "ORDER BY" in sql]
    assert len(listing) == 6  # three pages each
    for sql, params in listing:
        assert "OFFSET" not in sql or (sql.endswith("OFFSET ?") and params[-1] == 0)
