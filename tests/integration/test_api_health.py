"""The probes: `/healthz` always, `/readyz` per dependency, `/metrics` in Prometheus text."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tracker.api import create_app
from tracker.config import Settings
from tracker.db.models import UpstreamCredential
from tracker.upstream.budget import credential_key


def ready_app(settings: Settings, broker_url: str) -> TestClient:
    return TestClient(create_app(settings.model_copy(update={"broker_url": broker_url})))


def test_healthz_answers_without_authentication(api: TestClient) -> None:
    answer = api.get("/healthz")

    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}
    assert answer.headers["x-trace-id"]


def test_readyz_answers_200_when_database_broker_and_token_are_fine(
    settings: Settings, redis_url: str
) -> None:
    answer = ready_app(settings, redis_url).get("/readyz")

    assert answer.status_code == 200
    assert answer.json() == {
        "status": "ready",
        "checks": {"database": "ok", "broker": "ok", "upstream_credentials": "ok"},
        "detail": {},
    }


def test_readyz_answers_503_naming_an_unreachable_broker(settings: Settings) -> None:
    answer = ready_app(settings, "redis://127.0.0.1:1/0").get("/readyz")

    assert answer.status_code == 503
    body = answer.json()
    assert body["status"] == "unready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("unreachable: ")


def test_readyz_answers_503_when_the_upstream_rejected_the_token(
    settings: Settings, redis_url: str, session: Session
) -> None:
    session.add(
        UpstreamCredential(
            key=credential_key("test-token"),
            next_request_at=datetime.now(UTC),
            rejected_at=datetime(2026, 1, 1, tzinfo=UTC),
            rejected_reason="401 invalid token",
        )
    )
    session.commit()

    answer = ready_app(settings, redis_url).get("/readyz")

    assert answer.status_code == 503
    reason = answer.json()["checks"]["upstream_credentials"]
    assert reason.startswith("rejected by the upstream at 2026-01-01T00:00:00.000000Z")
    assert "401 invalid token" in reason


def test_a_rejection_of_another_token_does_not_make_the_service_unready(
    settings: Settings, redis_url: str, session: Session
) -> None:
    session.add(
        UpstreamCredential(
            key=credential_key("an-old-token"),
            next_request_at=datetime.now(UTC),
            rejected_at=datetime(2026, 1, 1, tzinfo=UTC),
            rejected_reason="401",
        )
    )
    session.commit()

    assert ready_app(settings, redis_url).get("/readyz").status_code == 200


def test_the_api_starts_and_readyz_answers_503_when_the_database_is_unreachable(
    redis_url: str,
) -> None:
    settings = Settings(
        database_url="postgresql://nobody@127.0.0.1:1/none",
        broker_url=redis_url,
        _env_file=None,  # type: ignore[call-arg]
    )

    with TestClient(create_app(settings)) as api:  # runs the start-up, which tries the database
        answer = api.get("/readyz")

    assert answer.status_code == 503
    checks = answer.json()["checks"]
    assert checks["database"].startswith("unreachable: ")
    assert checks["upstream_credentials"].startswith("unknown: ")


def test_metrics_answer_prometheus_text(api: TestClient) -> None:
    answer = api.get("/metrics")

    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    assert "# TYPE tracker_tasks gauge" in answer.text


def test_the_api_starts_on_each_database_with_its_connections_open(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up fills the connection pool: on SQLite it must not wait on its own lock."""
    with (
        caplog.at_level(logging.WARNING, logger="tracker.api"),
        # With a public URL: without one, the start-up says submissions have no doorbell.
        TestClient(
            create_app(settings.model_copy(update={"public_url": "https://t.example"}))
        ) as api,  # runs the start-up
    ):
        answer = api.get("/healthz")

    assert answer.status_code == 200
    assert [r.getMessage() for r in caplog.records if r.name == "tracker.api"] == []
