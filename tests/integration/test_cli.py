"""The history from the shell: `tracker tasks list|show`, `deliveries list`, `tracker api`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from tests.support.history_factory import T0, add_delivery, add_task
from tracker.cli.app import app
from tracker.config import get_settings
from tracker.db import engine as db
from tracker.tracking.clients import NewClient, create_client


@pytest.fixture
def shell(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    """A CLI runner whose commands use the test database (settings and engine read afresh)."""
    monkeypatch.setenv("TRACKER_DATABASE_URL", db_url)
    get_settings.cache_clear()
    db.get_engine.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()
    db.get_engine.cache_clear()


def run(shell: CliRunner, *args: str) -> Result:
    """Run a command on a terminal wide enough for every table column."""
    return shell.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "200"})


@pytest.fixture
def other(session: Session) -> NewClient:
    new = create_client(session, "globex")
    session.commit()
    return new


@pytest.fixture
def history(session: Session, client: NewClient, other: NewClient) -> None:
    """Tasks of two clients; one upstream id (`shared`) registered by both."""
    for n, state in enumerate(["pending", "running", "completed", "failed"]):
        task = add_task(
            session, client.client, f"t{n}", state=state, created_at=T0 + timedelta(minutes=n)
        )
        if state == "completed":
            add_delivery(session, task, status="failed", attempt_codes=(500, 502))
    add_task(session, client.client, "shared", created_at=T0 + timedelta(minutes=10))
    add_task(session, other.client, "shared", created_at=T0 + timedelta(minutes=11))
    session.commit()


@pytest.mark.usefixtures("history")
def test_tasks_list_json_is_what_the_api_answers(
    shell: CliRunner, api: TestClient, auth: dict[str, str]
) -> None:
    printed = run(shell, "tasks", "list", "--client", "acme", "--limit", "3", "--json")

    assert printed.exit_code == 0
    answered = api.get("/v1/tasks", params={"limit": 3}, headers=auth).json()
    assert json.loads(printed.stdout) == answered
    assert [t["task_id"] for t in answered["items"]] == ["shared", "t3", "t2"]


@pytest.mark.usefixtures("history")
def test_tasks_list_without_client_shows_every_clients_tasks_in_a_table(
    shell: CliRunner,
) -> None:
    printed = run(shell, "tasks", "list")

    assert printed.exit_code == 0
    assert "globex" in printed.stdout
    assert "acme" in printed.stdout
    assert printed.stdout.count("shared") == 2


@pytest.mark.usefixtures("history")
def test_tasks_list_filters_by_state_and_pages_with_the_cursor(shell: CliRunner) -> None:
    completed = json.loads(run(shell, "tasks", "list", "--state", "completed", "--json").stdout)
    first = run(shell, "tasks", "list", "--limit", "4")
    cursor = first.stdout.split("more: --cursor ")[1].split()[0]
    rest = json.loads(run(shell, "tasks", "list", "--cursor", cursor, "--json").stdout)

    assert [t["task_id"] for t in completed["items"]] == ["t2"]
    assert [t["task_id"] for t in rest["items"]] == ["t1", "t0"]
    assert rest["next_cursor"] is None


@pytest.mark.usefixtures("history")
def test_tasks_show_prints_the_history_as_a_timeline(shell: CliRunner) -> None:
    printed = run(shell, "tasks", "show", "t3")

    assert printed.exit_code == 0
    lines = printed.stdout.splitlines()
    steps = [line for line in lines if "->" in line]
    assert ["(registered)" in steps[0], "pending" in steps[1], "running" in steps[2]] == [True] * 3
    assert "failed" in steps[2]
    assert any("content_policy" in line for line in lines)


@pytest.mark.usefixtures("history")
def test_tasks_show_json_is_what_the_api_answers(
    shell: CliRunner, api: TestClient, auth: dict[str, str]
) -> None:
    printed = run(shell, "tasks", "show", "t2", "--json")

    assert printed.exit_code == 0
    answered = api.get("/v1/tasks/t2", headers=auth).json()
    assert json.loads(printed.stdout) == answered
    assert [d["status"] for d in answered["deliveries"]] == ["failed", "pending"]


@pytest.mark.usefixtures("history")
def test_tasks_show_asks_for_the_client_when_several_registered_the_task(
    shell: CliRunner,
) -> None:
    ambiguous = run(shell, "tasks", "show", "shared")
    chosen = run(shell, "tasks", "show", "shared", "--client", "globex", "--json")
    unknown = run(shell, "tasks", "show", "nope")

    assert ambiguous.exit_code == 1
    assert "acme, globex" in ambiguous.stderr
    assert "--client" in ambiguous.stderr
    assert chosen.exit_code == 0
    assert json.loads(chosen.stdout)["task_id"] == "shared"
    assert unknown.exit_code == 1
    assert "no task 'nope'" in unknown.stderr


@pytest.mark.usefixtures("history")
def test_deliveries_list_json_is_what_the_api_answers(
    shell: CliRunner, api: TestClient, auth: dict[str, str]
) -> None:
    printed = run(shell, "deliveries", "list", "--status", "failed", "--json")
    table = run(shell, "deliveries", "list")

    answered = api.get("/v1/deliveries", params={"status": "failed"}, headers=auth).json()
    assert json.loads(printed.stdout) == answered
    assert len(answered["items"]) == 1
    assert table.exit_code == 0
    assert "task.completed" in table.stdout


def test_a_bad_cursor_ends_the_command_with_its_message(shell: CliRunner) -> None:
    printed = run(shell, "tasks", "list", "--cursor", "garbage")

    assert printed.exit_code == 1
    assert "cursor: is not a cursor" in printed.stderr


def test_an_unknown_client_ends_the_command_with_its_message(shell: CliRunner) -> None:
    printed = run(shell, "deliveries", "list", "--client", "nobody")

    assert printed.exit_code == 1
    assert "no client named 'nobody'" in printed.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [((), ("127.0.0.1", 8000)), (("--host", "0.0.0.0", "--port", "9"), ("0.0.0.0", 9))],
)
def test_tracker_api_serves_the_app_on_the_configured_address(
    shell: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    expected: tuple[str, int],
) -> None:
    import uvicorn

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    monkeypatch.setattr("tracker.observability.logs.configure_logging", lambda *_a, **_k: None)

    printed = run(shell, "api", *args)

    assert printed.exit_code == 0
    assert (served["host"], served["port"]) == expected
    assert TestClient(served["app"]).get("/healthz").json() == {"status": "ok"}


def test_services_json_is_what_the_api_answers(
    shell: CliRunner, api: TestClient, auth: dict[str, str]
) -> None:
    printed = run(shell, "services", "--json")
    assert printed.exit_code == 0
    answered = api.get("/v1/services", headers=auth)
    assert answered.status_code == 200
    assert json.loads(printed.stdout) == answered.json()
    items = {item["service"]: item for item in answered.json()["items"]}
    assert items["suno"] == {
        "service": "suno",
        "endpoint": "/suno/tasks",
        "progress": True,
        "outputs": ["video", "audio", "file"],
    }
    assert (items["midjourney"]["progress"], items["midjourney"]["outputs"]) == (True, ["image"])
    assert items["luma"]["progress"] is False
    assert len(items) == 26


def test_services_table_shows_where_each_keeps_its_word_and_its_pace(
    shell: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACKER_SERVICE_POLL_INTERVALS", "kling=30")
    get_settings.cache_clear()
    printed = run(shell, "services")
    assert printed.exit_code == 0
    lines = {
        line.split("│")[1].strip(): line for line in printed.stdout.splitlines() if "│" in line
    }
    assert "response.data[].state" in lines["veo"]
    assert "10 s" in lines["suno"]
    assert "30 s" in lines["kling"]
    assert "5 s" in lines["luma"]


def test_services_need_an_api_key(api: TestClient) -> None:
    assert api.get("/v1/services").status_code == 401
