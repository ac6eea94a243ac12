"""The dashboard (`/ui`) over HTTP on both backends: sign-in, sessions, CSRF, isolation,
escaping, bad input, and the destinations seam. The browser tests (tests/browser/) drive
the same pages in Chromium."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tests.support.history_factory import add_delivery, add_task
from tracker.api import create_app
from tracker.api.ui.auth import SESSION_COOKIE, safe_next
from tracker.api.ui.sessions import create_sign_in_link_token
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.models import Client, DashboardSession, WebhookDelivery
from tracker.errors import TaskNotFound
from tracker.states import DELIVERY_FAILED, DELIVERY_PENDING
from tracker.tracking.clients import NewClient, create_client, hash_api_key

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def sign_in(api: TestClient, api_key: str, next_path: str = "/ui/") -> Any:
    form = api.get("/ui/login")
    return api.post(
        "/ui/login",
        data={"api_key": api_key, "csrf_token": csrf_of(form.text), "next": next_path},
        follow_redirects=False,
    )


@pytest.fixture
def signed_in(api: TestClient, client: NewClient) -> TestClient:
    answer = sign_in(api, client.api_key)
    assert answer.status_code == 303
    return api


def test_pages_need_a_session_and_keep_the_page_asked_for(api: TestClient) -> None:
    answer = api.get("/ui/tasks?state=failed", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/login?next=%2Fui%2Ftasks%3Fstate%3Dfailed"
    live = api.get("/ui/live/tasks?id=1")
    assert live.status_code == 401
    assert live.json()["error"]["code"] == "sign_in_required"


def test_a_wrong_key_gets_the_sign_in_page_with_a_message(api: TestClient) -> None:
    answer = sign_in(api, "trk_not-a-key", "/ui/tasks")
    assert answer.status_code == 401
    assert "That API key is not valid" in answer.text
    assert 'name="next" value="/ui/tasks"' in answer.text
    assert SESSION_COOKIE not in answer.cookies


def test_sign_in_sets_a_strict_http_only_cookie_and_goes_where_asked(
    api: TestClient, client: NewClient, session: Session
) -> None:
    answer = sign_in(api, client.api_key, "/ui/deliveries?status=failed")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/deliveries?status=failed"
    cookie = next(
        h for h in answer.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE + "=")
    )
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/ui" in cookie
    token = cookie.split("=", 1)[1].split(";", 1)[0]
    stored = session.scalars(select(DashboardSession.id)).all()
    assert token not in stored, "the database keeps a hash of the token, never the token"
    assert client.api_key not in str(session.scalars(select(DashboardSession)).all())
    session.rollback()  # SQLite: a transaction left open holds the write lock
    assert api.get("/ui/tasks").status_code == 200


def test_sign_in_without_the_forms_csrf_token_is_refused(
    api: TestClient, client: NewClient
) -> None:
    answer = api.post(
        "/ui/login",
        data={"api_key": client.api_key, "csrf_token": "forged"},
        follow_redirects=False,
    )
    assert answer.status_code == 403
    assert SESSION_COOKIE not in answer.cookies


@pytest.mark.parametrize(
    ("asked", "goes_to"),
    [
        ("/ui/tasks?state=running", "/ui/tasks?state=running"),
        ("/ui", "/ui"),
        ("https://evil.example/ui/", "/ui/"),
        ("//evil.example/ui/", "/ui/"),
        ("/\\evil.example", "/ui/"),
        ("/v1/tasks", "/ui/"),
        ("/ui/logout", "/ui/"),
        ("javascript:alert(1)", "/ui/"),
        ("/ui/\r\nSet-Cookie: x=1", "/ui/"),
        ("", "/ui/"),
    ],
)
def test_next_is_a_local_dashboard_path_or_the_overview(asked: str, goes_to: str) -> None:
    assert safe_next(asked) == goes_to


def test_a_changed_api_key_ends_its_sessions(
    signed_in: TestClient, client: NewClient, session: Session
) -> None:
    session.execute(
        update(Client)
        .where(Client.id == client.client.id)
        .values(api_key_hash=hash_api_key("trk_rotated"))
    )
    session.commit()
    answer = signed_in.get("/ui/tasks", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"].endswith("&ended=expired")


def test_an_expired_session_goes_back_to_sign_in_and_then_to_the_page(
    signed_in: TestClient, client: NewClient, session: Session
) -> None:
    session.execute(update(DashboardSession).values(expires_at=utcnow() - timedelta(seconds=1)))
    session.commit()
    answer = signed_in.get("/ui/deliveries?status=failed", follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"] == (
        "/ui/login?next=%2Fui%2Fdeliveries%3Fstatus%3Dfailed&ended=expired"
    )
    page = signed_in.get(answer.headers["location"])
    assert "Your session has ended" in page.text
    again = sign_in(signed_in, client.api_key, "/ui/deliveries?status=failed")
    assert again.headers["location"] == "/ui/deliveries?status=failed"


def test_sign_out_ends_the_session_for_every_copy_of_the_cookie(
    signed_in: TestClient, session: Session
) -> None:
    token = signed_in.cookies[SESSION_COOKIE]
    page = signed_in.get("/ui/tasks")
    answer = signed_in.post(
        "/ui/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False
    )
    assert answer.status_code == 303
    assert session.scalars(select(DashboardSession)).all() == []
    session.rollback()
    signed_in.cookies.set(SESSION_COOKIE, token, path="/ui")
    assert signed_in.get("/ui/tasks", follow_redirects=False).status_code == 303


def test_a_sign_in_link_works_once_and_not_after_it_expires(
    api: TestClient, client: NewClient, session: Session
) -> None:
    token = create_sign_in_link_token(session, client.client, now=utcnow())
    stale = create_sign_in_link_token(
        session, client.client, now=utcnow() - timedelta(hours=1), seconds=60
    )
    session.commit()
    first = api.get(f"/ui/login?token={token}&next=/ui/tasks")
    assert first.status_code == 200
    assert 'content="0;url=/ui/tasks"' in first.text
    assert SESSION_COOKIE in first.cookies
    api.cookies.clear()
    again = api.get(f"/ui/login?token={token}")
    assert again.status_code == 401
    assert "used already or has expired" in again.text
    assert api.get(f"/ui/login?token={stale}").status_code == 401
    assert api.get("/ui/login?token=" + "x" * 5000).status_code == 401


def test_a_form_without_the_sessions_csrf_token_changes_nothing(
    signed_in: TestClient, client: NewClient, session: Session
) -> None:
    task = add_task(session, client.client, "t-csrf", state="completed", callback_url=None)
    delivery = add_delivery(session, task, status=DELIVERY_FAILED, attempt_codes=(500,))
    session.commit()
    for forged in ("", "0" * 64):
        answer = signed_in.post(f"/ui/deliveries/{delivery.id}/retry", data={"csrf_token": forged})
        assert answer.status_code == 403
        assert "CSRF" in answer.text
    session.expire_all()
    assert session.get(WebhookDelivery, delivery.id).status == DELIVERY_FAILED  # type: ignore[union-attr]


def test_retry_makes_a_failed_delivery_due_and_says_so(
    signed_in: TestClient, client: NewClient, session: Session
) -> None:
    task = add_task(session, client.client, "t-retry", state="completed", callback_url=None)
    delivery = add_delivery(session, task, status=DELIVERY_FAILED, attempt_codes=(500, 503))
    session.commit()
    page = signed_in.get(f"/ui/deliveries/{delivery.id}")
    assert "answer 503" in page.text
    answer = signed_in.post(
        f"/ui/deliveries/{delivery.id}/retry",
        data={"csrf_token": csrf_of(page.text), "next": f"/ui/deliveries/{delivery.id}"},
        follow_redirects=False,
    )
    assert answer.headers["location"] == f"/ui/deliveries/{delivery.id}?notice=retried"
    session.expire_all()
    assert session.get(WebhookDelivery, delivery.id).status == DELIVERY_PENDING  # type: ignore[union-attr]
    session.rollback()
    shown = signed_in.get(answer.headers["location"])
    assert "Due again now" in shown.text


def test_retrying_an_outdated_delivery_explains_why_not(
    signed_in: TestClient, client: NewClient, session: Session
) -> None:
    task = add_task(session, client.client, "t-old", state="completed", callback_url=None)
    older = add_delivery(session, task, status=DELIVERY_FAILED, event="task.running")
    add_delivery(session, task, created_at=older.created_at + timedelta(minutes=1))
    session.commit()
    page = signed_in.get("/ui/deliveries")
    answer = signed_in.post(
        f"/ui/deliveries/{older.id}/retry",
        data={"csrf_token": csrf_of(page.text), "next": "/ui/deliveries"},
    )
    assert answer.status_code == 200
    assert "older than another delivery of its task" in answer.text


def test_a_client_never_sees_or_touches_another_clients_rows(
    signed_in: TestClient, client: NewClient, session: Session
) -> None:
    other = create_client(session, "other")
    theirs = add_task(session, other.client, "their-task", state="completed", callback_url=None)
    their_delivery = add_delivery(session, theirs, status=DELIVERY_FAILED, attempt_codes=(500,))
    add_task(session, client.client, "our-task", state="running")
    session.commit()
    their_row_id = theirs.id
    listing = signed_in.get("/ui/tasks").text
    assert "our-task" in listing
    assert "their-task" not in listing
    assert their_delivery.id not in signed_in.get("/ui/deliveries").text
    assert signed_in.get("/ui/tasks/their-task").status_code == 404
    assert signed_in.get(f"/ui/deliveries/{their_delivery.id}").status_code == 404
    assert signed_in.get("/ui/deliveries?task_id=their-task").text.count("their-task") == 1
    page = signed_in.get("/ui/tasks")
    answer = signed_in.post(
        f"/ui/deliveries/{their_delivery.id}/retry", data={"csrf_token": csrf_of(page.text)}
    )
    assert answer.status_code == 404
    session.expire_all()
    assert session.get(WebhookDelivery, their_delivery.id).status == DELIVERY_FAILED  # type: ignore[union-attr]
    session.rollback()
    live = signed_in.get(f"/ui/live/tasks?id={their_row_id}").json()
    assert live == {"tasks": {}}
    overview = signed_in.get("/ui/").text
    assert ">1</span>" in overview  # our one task, not theirs too


def test_supplied_values_render_as_text(
    signed_in: TestClient, client: NewClient, session: Session
) -> None:
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    task = add_task(session, client.client, "t-xss", state="completed", callback_url=None)
    task.metadata_ = {"note": evil}
    task.record = {"id": "t-xss", "response": {"state": evil, "video_url": "javascript:alert(3)"}}
    add_delivery(session, task, status=DELIVERY_FAILED, attempt_codes=(500,))
    session.flush()
    session.execute(update(WebhookDelivery).values(callback_url=f"https://x.example/{evil}"))
    session.commit()
    for path in ("/ui/tasks/t-xss", "/ui/deliveries", "/ui/tasks"):
        html = signed_in.get(path).text
        assert "<script>alert" not in html
        assert "onerror=alert(2)>" not in html.replace("&gt;", ">").split("&lt;img")[0]
    html = signed_in.get("/ui/tasks/t-xss").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_every_dashboard_answer_carries_the_security_headers(signed_in: TestClient) -> None:
    for path in ("/ui/", "/ui/tasks", "/ui/deliveries", "/ui/destinations", "/ui/login"):
        headers = signed_in.get(path).headers
        policy = headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "default-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize(
    "path",
    [
        "/ui/tasks?state=<b>&service=UPPER",
        "/ui/tasks?cursor=not-a-cursor",
        "/ui/tasks?cursor=" + "A" * 3000,
        "/ui/tasks/%3Cscript%3E?service=..",
        "/ui/tasks/x?service=" + "a" * 100,
        "/ui/deliveries?status=nope&task_id=%00",
        "/ui/deliveries?cursor=eyJsIjoidGFza3MifQ",
        "/ui/deliveries/" + "x" * 200,
        "/ui/live/tasks?id=abc&id=-1&id=99999999999999999999999",
    ],
)
def test_bad_input_gets_a_page_or_a_clear_answer_never_a_500(
    signed_in: TestClient, path: str
) -> None:
    answer = signed_in.get(path)
    assert answer.status_code < 500, answer.text
    assert "Traceback" not in answer.text
    assert "<b>" not in answer.text


def test_replay_and_destinations_say_they_are_not_available_without_the_engine(
    signed_in: TestClient,
) -> None:
    page = signed_in.get("/ui/destinations").text
    assert "does not track destinations yet" in page
    answer = signed_in.post(
        "/ui/deliveries/replay",
        data={"csrf_token": csrf_of(page), "since": "2026-01-01T00:00"},
        follow_redirects=False,
    )
    assert answer.headers["location"] == "/ui/deliveries?error=not_available"


class RecordingOperations:
    """The delivery engine's destination operations as the dashboard calls them: a double
    that records calls, standing in until the engine provides them."""

    def __init__(self) -> None:
        self.destinations: dict[str, dict[str, Any]] = {
            "d1": {
                "id": "d1", "scheme": "https", "host": "hooks.example.com", "port": 443,
                "state": "open", "consecutive_failures": 20, "last_success_at": None,
                "held_deliveries": 7,
            },
        }  # fmt: skip
        self.replays: list[dict[str, Any]] = []

    def list_destinations(self, session: Session, *, client_id: int) -> list[dict[str, Any]]:
        return list(self.destinations.values())

    def resume_destination(
        self, session: Session, destination_id: str, *, client_id: int, now: Any
    ) -> dict[str, Any]:
        if destination_id not in self.destinations:
            raise TaskNotFound(destination_id)
        self.destinations[destination_id]["state"] = "healthy"
        return self.destinations[destination_id]

    def replay_deliveries(self, session: Session, **query: Any) -> int:
        self.replays.append(query)
        return 3


def test_destinations_and_replay_go_through_the_engines_operations(
    settings: Settings, client: NewClient
) -> None:
    app = create_app(settings)
    operations = RecordingOperations()
    app.state.destination_operations = operations
    api = TestClient(app)
    sign_in(api, client.api_key)
    overview = api.get("/ui/").text
    assert "1 of 1 open or disabled" in overview
    page = api.get("/ui/destinations").text
    assert "hooks.example.com" in page
    answer = api.post(
        "/ui/destinations/d1/resume", data={"csrf_token": csrf_of(page)}, follow_redirects=False
    )
    assert answer.headers["location"] == "/ui/destinations?notice=resumed"
    assert operations.destinations["d1"]["state"] == "healthy"
    assert (
        api.post("/ui/destinations/nope/resume", data={"csrf_token": csrf_of(page)}).status_code
        == 404
    )

    bad = api.post(
        "/ui/deliveries/replay",
        data={"csrf_token": csrf_of(page), "since": "yesterday", "event": "task.bogus"},
    )
    assert bad.status_code == 422
    assert "since: is not a time" in bad.text
    assert "event: must be one of" in bad.text
    assert operations.replays == []
    done = api.post(
        "/ui/deliveries/replay",
        data={"csrf_token": csrf_of(page), "since": "2026-01-01T00:00", "status": "failed"},
        follow_redirects=False,
    )
    assert done.headers["location"] == "/ui/deliveries?notice=replayed&count=3"
    (replayed,) = operations.replays
    assert replayed["since"].isoformat() == "2026-01-01T00:00:00+00:00"
    assert replayed["status"] == "failed"
    assert replayed["client_id"] == client.client.id


def test_docs_load_swagger_ui_from_this_server_only(api: TestClient) -> None:
    html = api.get("/docs").text
    assert "SwaggerUIBundle" in html
    hosts = re.findall(r"(?:src|href)=['\"]((?:https?:)?//[^'\"]+)", html)
    assert hosts == [], f"/docs loads from other hosts: {hosts}"
    assert not re.search(r"https?://(?!127\.0\.0\.1)", html.replace("http://testserver", ""))
    for asset in re.findall(r"(?:src|href)=['\"](/[^'\"]+)", html):
        assert api.get(asset).status_code == 200, asset
    assert api.get("/redoc").status_code == 404


def test_the_cli_prints_a_one_time_sign_in_link(
    db_url: str, client: NewClient, api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from tracker.cli.app import app
    from tracker.config import get_settings
    from tracker.db import engine as db

    monkeypatch.setenv("TRACKER_DATABASE_URL", db_url)
    get_settings.cache_clear()
    db.get_engine.cache_clear()
    try:
        result = CliRunner().invoke(
            app,
            ["clients", "sign-in-link", "acme", "--base-url", "http://testserver/"],
            catch_exceptions=False,
            env={"COLUMNS": "200"},
        )
    finally:
        get_settings.cache_clear()
        db.get_engine.cache_clear()
    assert result.exit_code == 0, result.output
    link = re.search(r"http://testserver(/ui/login\?token=[A-Za-z0-9_-]+)", result.output)
    assert link, result.output
    assert client.api_key not in result.output
    assert api.get("/ui/", follow_redirects=False).status_code == 303
    api.get(link.group(1))
    assert api.get("/ui/", follow_redirects=False).status_code == 200
