"""The OpenAPI document is exactly as strict as the validation, and every 405 tells the truth.

Generated clients and fuzzers keep to `/openapi.json`: what it allows is accepted, what it
forbids is refused. `schemathesis run` with its checks, against a real `tracker api` on
loopback, is the judge.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
from fastapi.testclient import TestClient
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from tests.support.processes import wait_until
from tests.support.sim import SimulatorHandle
from tracker.db.engine import make_engine
from tracker.devtools.demo import free_port
from tracker.tracking.clients import create_client
from tracker.tracking.schemas import CALLBACK_URL_PATTERN, TaskRegistration


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/tasks/batch", "POST"),
        ("GET", "/v1/tasks/batch", "POST"),
        ("DELETE", "/v1/tasks/batch", "POST"),
        ("OPTIONS", "/v1/tasks/batch", "POST"),
        ("PUT", "/v1/tasks/t1", "DELETE, GET"),
        ("DELETE", "/v1/tasks", "GET, POST"),
        ("GET", "/v1/deliveries/msg_1/retry", "POST"),
        ("POST", "/healthz", "GET"),
    ],
)
def test_a_405_lists_exactly_the_methods_of_the_path(
    api: TestClient, auth: dict[str, str], method: str, path: str, allowed: str
) -> None:
    answer = api.request(method, path, headers=auth)

    assert answer.status_code == 405
    assert answer.headers["allow"] == allowed
    assert f"(allowed: {allowed})" in answer.json()["error"]["message"]
    documented = api.get("/openapi.json").json()["paths"]
    template = "/v1/tasks/{task_id}" if path == "/v1/tasks/t1" else path
    template = template.replace("msg_1", "{delivery_id}")
    assert ", ".join(sorted(m.upper() for m in documented[template])) == allowed


def test_the_document_states_what_the_validation_enforces(api: TestClient) -> None:
    spec: dict[str, Any] = api.get("/openapi.json").json()
    registration = spec["components"]["schemas"]["TaskRegistration"]["properties"]
    url = registration["callback_url"]["anyOf"][0]
    assert url == {"type": "string", "maxLength": 2048, "pattern": CALLBACK_URL_PATTERN}
    assert registration["task_id"]["pattern"] == "^[A-Za-z0-9._:-]{1,128}$"
    assert registration["metadata"]["additionalProperties"] is False

    def parameter(path: str, method: str, name: str) -> dict[str, Any]:
        (found,) = [p for p in spec["paths"][path][method]["parameters"] if p["name"] == name]
        schema: dict[str, Any] = found["schema"]
        return schema

    assert parameter("/v1/tasks", "get", "cursor")["anyOf"][0]["pattern"].startswith("^t~")
    assert parameter("/v1/deliveries", "get", "cursor")["anyOf"][0]["pattern"].startswith("^d~")
    assert parameter("/v1/tasks", "get", "limit")["maximum"] == 500
    assert parameter("/v1/tasks/{task_id}", "get", "task_id")["not"] == {"const": "batch"}


@hypothesis.settings(max_examples=300, deadline=None, database=None)
@hypothesis.given(url=st.from_regex(CALLBACK_URL_PATTERN, fullmatch=True))
def test_every_callback_url_of_the_documented_form_is_accepted(url: str) -> None:
    hypothesis.assume(len(url) <= 2048)
    assert TaskRegistration.model_validate({"task_id": "t1", "callback_url": url})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"task_id": "t1", "callback_url": ""}, "callback_url"),
        ({"task_id": "t1", "callback_url": "HTTP://example.com/"}, "callback_url"),
        ({"task_id": "t1", "metadata": {"a": "\x00"}}, "metadata"),
        ({"task_id": "t1", "metadata": {"\x00": 1}}, "metadata"),
    ],
)
def test_what_the_document_forbids_is_refused_naming_the_field(
    api: TestClient, auth: dict[str, str], body: dict[str, Any], field: str
) -> None:
    answer = api.post("/v1/tasks", json=body, headers=auth)
    assert answer.status_code == 422
    assert answer.json()["error"]["message"].startswith(f"{field}")


def test_a_foreign_cursor_is_refused_by_the_document_and_the_api(
    api: TestClient, auth: dict[str, str]
) -> None:
    answer = api.get("/v1/deliveries", params={"cursor": "t~1~1"}, headers=auth)
    assert answer.status_code == 422
    assert answer.json()["error"]["code"] == "invalid_cursor"


# Operations whose rules span what JSON Schema can state, checked without
# `positive_data_acceptance`: a replay's `until` must not be before its `since`, and an
# Idempotency-Key names one submission (the same key with another body is refused).
CROSS_FIELD_RULES = ("/v1/deliveries/replay", "/v1/{service}/submit")
# It answers 204 to any token, by design: there is no "invalid" doorbell.
ANSWERS_ANYTHING = ("/v1/doorbell/{token}",)


def test_schemathesis_run_with_its_checks_passes_against_a_real_api(
    pg_url: str, simulator: SimulatorHandle, tmp_path: Path
) -> None:
    """Every check but `use_after_free`: it takes a 2xx DELETE to remove the resource,
    while `DELETE /v1/tasks/{task_id}` cancels the task and keeps its history readable
    (docs/api.md), on purpose. Seeded, and bounded to 20 examples per operation; on
    PostgreSQL, the production database, with the simulator as the upstream."""
    engine = make_engine(pg_url)
    with Session(engine) as session:
        client = create_client(session, "fuzzer")
        session.commit()
    engine.dispose()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKER_", "PROMETHEUS_"))}
    env |= {
        "TRACKER_DATABASE_URL": pg_url,
        # Submissions and the AceData-compatible route go nowhere else; the simulator is
        # reset by its fixture, so no fault an earlier test injected answers for it.
        "TRACKER_UPSTREAM_URL": simulator.url,
        "TRACKER_LOG_LEVEL": "WARNING",
    }
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", "tracker", "api", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/healthz"), timeout=60, what="the API")
        everything_else = [f"--exclude-path={p}" for p in CROSS_FIELD_RULES + ANSWERS_ANYTHING]
        cross_field = [f"--include-path={p}" for p in CROSS_FIELD_RULES]
        runs = [
            _schemathesis(url, client.api_key, tmp_path, env, [*everything_else]),
            _schemathesis(
                url, client.api_key, tmp_path, env, [*cross_field], "positive_data_acceptance"
            ),
        ]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(api.pid, signal.SIGTERM)
        api.wait(20)
        log.close()
    for run in runs:
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def _schemathesis(
    url: str,
    api_key: str,
    cwd: Path,
    env: dict[str, str],
    filters: list[str],
    *also_excluded: str,
) -> subprocess.CompletedProcess[str]:
    """`schemathesis run` of the operations `filters` select, with every check but
    `use_after_free` and `also_excluded`."""
    return subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{url}/openapi.json",
            *filters,
            "--checks",
            "all",
            "--exclude-checks",
            ",".join(["use_after_free", *also_excluded]),
            "--header",
            f"Authorization: Bearer {api_key}",
            "--max-examples",
            "20",
            "--seed",
            "21",
            # One: hypothesis describes its filters by parsing source, and parsing in
            # several threads at once trips CPython 3.11 ("AST constructor recursion
            # depth mismatch").
            "--workers",
            "1",
            "--no-color",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
