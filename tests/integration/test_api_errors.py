"""The error contract: one shape everywhere, a trace id on every answer, no input gives a 500."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from schemathesis import GenerationMode

from tests.support.sim import SimulatorHandle
from tracker.api import create_app
from tracker.api import tasks as tasks_routes
from tracker.config import Settings
from tracker.tracking.clients import NewClient

V1_ROUTES = [
    ("POST", "/v1/tasks"),
    ("POST", "/v1/tasks/batch"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/tasks/t1"),
    ("DELETE", "/v1/tasks/t1"),
    ("GET", "/v1/deliveries"),
    ("GET", "/v1/deliveries/msg_1"),
    ("POST", "/v1/deliveries/msg_1/retry"),
]
JSON = {"content-type": "application/json"}


def error_of(response: Any) -> dict[str, str]:
    """The error of an answer, checking the shape every error shares."""
    body = response.json()
    assert set(body) == {"error", "trace_id"}
    assert set(body["error"]) == {"code", "message"}
    assert body["trace_id"] == response.headers["x-trace-id"]
    assert len(body["trace_id"]) == 32
    return dict(body["error"])


@pytest.mark.parametrize(("method", "path"), V1_ROUTES)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer trk_not-a-key", "Basic dXNlcjpwYXNz", "Bearer ", "trk_x"]
)
def test_every_v1_route_needs_a_valid_api_key(
    api: TestClient, client: NewClient, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    answer = api.request(method, path, headers=headers, json={"task_id": "t1", "tasks": []})

    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert error_of(answer)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "message_start"),
    [
        (b"{not json", "body: is not valid JSON"),
        (b'{"task_id": "a",}', "body: is not valid JSON"),
        (b"\xff\xfe\x00\xd8", "body: is not valid JSON"),
        (b'{"task_id": "\xe9t\xe9"}', "body: is not valid JSON"),
        (b"[" * 100_000, "body: is not valid JSON"),
    ],
)
def test_a_body_that_is_not_json_answers_400(
    api: TestClient, auth: dict[str, str], body: bytes, message_start: str
) -> None:
    answer = api.post("/v1/tasks", content=body, headers={**auth, **JSON})

    assert answer.status_code == 400
    error = error_of(answer)
    assert error["code"] == "invalid_json"
    assert error["message"].startswith(message_start)


@pytest.mark.parametrize(
    ("body", "headers", "message_start"),
    [
        (b"[1, 2]", JSON, "body: must be a JSON object"),
        (b'"task"', JSON, "body: must be a JSON object"),
        (b"null", JSON, "body: must be a JSON object"),
        (b"", JSON, "body: is required"),
        (b'{"task_id": "a"}', {"content-type": "text/plain"}, "body: must be a JSON object"),
    ],
)
def test_json_that_is_not_an_object_answers_422(
    api: TestClient, auth: dict[str, str], body: bytes, headers: dict[str, str], message_start: str
) -> None:
    answer = api.post("/v1/tasks", content=body, headers={**auth, **headers})

    assert answer.status_code == 422
    assert error_of(answer)["message"].startswith(message_start)


def test_a_body_over_1_mib_answers_413_by_its_length(api: TestClient, auth: dict[str, str]) -> None:
    answer = api.post("/v1/tasks", content=b"x" * (1024 * 1024 + 1), headers={**auth, **JSON})

    assert answer.status_code == 413
    assert error_of(answer)["code"] == "payload_too_large"


def test_a_streamed_body_over_1_mib_answers_413(api: TestClient, auth: dict[str, str]) -> None:
    """Without Content-Length (chunked), the bytes are counted as they arrive."""

    def chunks() -> Iterator[bytes]:
        for _ in range(12):
            yield b" " * 100_000

    answer = api.post("/v1/tasks/batch", content=chunks(), headers={**auth, **JSON})

    assert "content-length" not in answer.request.headers
    assert answer.status_code == 413
    assert error_of(answer)["code"] == "payload_too_large"


def test_a_body_just_under_1_mib_is_read(api: TestClient, auth: dict[str, str]) -> None:
    body = b'{"tasks": []}' + b" " * (1024 * 1024 - 20)

    answer = api.post("/v1/tasks/batch", content=body, headers={**auth, **JSON})

    assert answer.status_code == 200
    assert answer.json() == {"items": []}


def test_an_unknown_route_answers_404_in_the_error_shape(api: TestClient) -> None:
    for path in ("/nope", "/v1/tasks/", "/v1/tasks/a/b", "/v2/tasks"):
        answer = api.get(path)
        assert answer.status_code == 404, path
        assert error_of(answer)["code"] == "not_found"


def test_a_wrong_method_answers_405_naming_the_allowed_ones(
    api: TestClient, auth: dict[str, str]
) -> None:
    answer = api.put("/v1/tasks", headers=auth)

    assert answer.status_code == 405
    assert "GET" in answer.headers["allow"]
    error = error_of(answer)
    assert error["code"] == "method_not_allowed"
    assert "PUT" in error["message"]


@pytest.mark.parametrize(
    ("path", "field"),
    [("/v1/tasks/bad%00id", "task_id"), ("/v1/tasks/" + "x" * 200, "task_id")],
)
def test_a_bad_task_id_in_the_path_answers_422(
    api: TestClient, auth: dict[str, str], path: str, field: str
) -> None:
    answer = api.get(path, headers=auth)

    assert answer.status_code == 422
    assert error_of(answer)["message"].startswith(f"{field}: ")


def test_an_unexpected_failure_answers_500_without_a_stack_trace_and_logs_the_trace_id(
    api: TestClient,
    auth: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(tasks_routes, "list_tasks", broken)

    with caplog.at_level(logging.INFO, logger="tracker.api"):
        answer = api.get("/v1/tasks", headers=auth)

    assert answer.status_code == 500
    error = error_of(answer)
    assert error["code"] == "internal_error"
    assert "fire" not in answer.text
    assert "Traceback" not in answer.text
    trace_id = answer.json()["trace_id"]
    failure = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failure) == 1
    assert getattr(failure[0], "trace_id", None) == trace_id
    assert failure[0].exc_info is not None


def test_a_database_that_cannot_be_reached_answers_503_to_be_retried(settings: Settings) -> None:
    """PostgreSQL restarting or down (the fault suite does both) is no reason for a 500."""
    from tracker.devtools.demo import free_port

    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/gone"
    api = TestClient(create_app(settings.model_copy(update={"database_url": nowhere})))
    body = {"task_id": "t1"}
    answer = api.post("/v1/tasks", json=body, headers={"Authorization": "Bearer tk_whatever"})

    assert answer.status_code == 503
    assert error_of(answer)["code"] == "database_unavailable"
    assert answer.headers["retry-after"] == "2"


def test_every_answer_is_logged_once_with_its_trace_id(
    api: TestClient, auth: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tracker.api"):
        answers = [api.get("/healthz"), api.get("/v1/tasks", headers=auth), api.get("/nope")]

    lines = [r for r in caplog.records if r.name == "tracker.api"]
    assert [getattr(r, "trace_id", None) for r in lines] == [
        a.headers["x-trace-id"] for a in answers
    ]
    assert [getattr(r, "status", None) for r in lines] == [200, 200, 404]
    assert all(
        a.headers["x-trace-id"] in r.getMessage() for a, r in zip(answers, lines, strict=True)
    )


def test_the_openapi_document_describes_every_route_and_its_errors(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()

    assert set(spec["paths"]) == {
        "/v1/tasks", "/v1/tasks/batch", "/v1/tasks/{task_id}", "/v1/deliveries",
        "/v1/deliveries/{delivery_id}", "/v1/deliveries/{delivery_id}/retry",
        "/v1/{service}/submit", "/v1/doorbell/{token}", "/acedata/{service}/tasks",
        "/v1/deliveries/replay", "/v1/destinations", "/v1/destinations/{destination_id}/resume",
        "/v1/client", "/healthz", "/readyz", "/metrics", "/v1/services",
    }  # fmt: skip
    error_ref = "#/components/schemas/ErrorBody"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if not path.startswith("/v1") or path.startswith("/v1/doorbell/"):
                continue  # the doorbell takes no key and no body, and answers 204 whatever
            responses = operation["responses"]
            # 422 where there is input to refuse: parameters or a body.
            takes_input = bool(operation.get("parameters") or operation.get("requestBody"))
            for status in ("401", "422", "500") if takes_input else ("401", "500"):
                schema = responses[status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": error_ref}, (method, path, status)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert api.get("/docs").status_code == 200


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzing_the_openapi_document_finds_no_server_error_and_no_schema_violation(
    settings: Settings,
    auth: dict[str, str],
    redis_url: str,
    mode: GenerationMode,
    simulator: SimulatorHandle,
) -> None:
    """Schemathesis against the app's own /openapi.json, a dozen cases per operation and mode.

    Every check runs, "schema-valid data is accepted" included: the document states
    what the validation enforces (tests/integration/test_openapi_contract.py).
    """
    # Submissions and the AceData-compatible route reach the upstream: the simulator.
    upstream = {"broker_url": redis_url, "upstream_url": simulator.url}
    app = create_app(settings.model_copy(update=upstream), poll_doorbell=lambda ids: None)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not operation.path.startswith("/v1"):
            continue  # the probes take no input at all: nothing to get wrong
        if mode is GenerationMode.NEGATIVE and operation.path.startswith("/v1/doorbell/"):
            continue  # it answers 204 to any token by design: nothing is "invalid"

        @hypothesis.settings(
            max_examples=12,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def call(case: schemathesis.Case) -> None:
            headers = dict(auth)
            if mode is GenerationMode.POSITIVE and "Idempotency-Key" in (case.headers or {}):
                # A key names one submission: the same key with another body is refused
                # (422, as the Idempotency-Key draft says), so each valid case brings its own.
                headers["Idempotency-Key"] = uuid.uuid4().hex
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
                _bound_in_order(case.body)
            case.call_and_validate(headers=headers)

        try:
            call()
        except Exception as exc:
            raise AssertionError(f"{operation.method} {operation.path}") from exc
        checked += 1
    # Operations: 16 under /v1 (GET and DELETE /v1/tasks/{task_id} are two, GET and PATCH
    # /v1/client too; submit, the doorbell), the AceData-compatible route, 3 probes; the
    # negative run leaves out the probes, the doorbell and the AceData-compatible route.
    assert checked == (20 if mode is GenerationMode.POSITIVE else 15)


def _bound_in_order(body: dict[str, Any]) -> None:
    """A replay's `until` before its `since` is refused (422): a rule between two fields,
    which docs/api.md states and JSON Schema cannot. Valid cases keep them in order."""
    since, until = body.get("since"), body.get("until")
    if isinstance(since, str) and isinstance(until, str):
        try:
            inverted = datetime.fromisoformat(until) < datetime.fromisoformat(since)
        except ValueError:
            return
        if inverted:
            body["since"], body["until"] = until, since


def test_a_query_parameter_the_route_does_not_take_is_named_not_ignored(
    api: TestClient, auth: dict[str, str]
) -> None:
    """A mistyped filter would otherwise list everything, as if it had matched."""
    answer = api.get("/v1/tasks?stat=failed", headers=auth)
    assert answer.status_code == 422
    message = answer.json()["error"]["message"]
    assert message.startswith("stat: is not a query parameter of this route")
    assert "state" in message
    assert api.get("/v1/tasks?state=failed&limit=5", headers=auth).status_code == 200
    assert api.get("/v1/deliveries?task_id=x&cursorr=1", headers=auth).status_code == 422
    assert api.get("/v1/tasks?stat=failed").status_code == 401  # the key is checked first
