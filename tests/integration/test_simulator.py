"""The simulator against the vendor's own documentation and SDK, over real HTTP.

`tests/support/upstream/luma-tasks-api.txt` is a verbatim copy of AceData's Luma Tasks
API page; its curl examples and response examples are parsed here, so the
simulator cannot drift from the page.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from acedatacloud import AceDataCloud, AuthenticationError
from acedatacloud._runtime.tasks import task_status

from tests.support.sim import SimulatorHandle

VENDOR_PAGE = Path(__file__).parents[1] / "support" / "upstream" / "luma-tasks-api.txt"
VENDOR_BASE = "https://api.acedata.cloud"


def vendor_json_examples() -> list[Any]:
    """Every JSON document of the vendor page that starts on a line of its own."""
    text = VENDOR_PAGE.read_text()
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(text, m.start())[0] for m in re.finditer(r"^\{$", text, re.M)]


def vendor_curl_examples() -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(url, headers, body) of each curl example of the vendor page."""
    examples = []
    for command in re.findall(r"^curl .*?\}'$", VENDOR_PAGE.read_text(), re.M | re.S):
        url = re.search(r"curl -X POST '([^']+)'", command)
        body = re.search(r"-d '(.*)'$", command, re.S)
        assert url is not None, command
        assert body is not None, command
        headers = dict(h.split(": ", 1) for h in re.findall(r"-H '([^']+)'", command))
        examples.append((url.group(1), headers, json.loads(body.group(1))))
    return examples


def shape(value: Any) -> Any:
    """The keys and scalar types of a JSON document, to compare documents by structure."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


RECORD_EXAMPLE, BATCH_EXAMPLE, ERROR_EXAMPLE = vendor_json_examples()


def seed_vendor_tasks(simulator: SimulatorHandle) -> None:
    """The tasks of the vendor's examples, settled as completed, with their prompts."""
    tasks = [
        {"id": item["id"], "prompt": item["request"]["prompt"], "outcome": "completed"}
        for item in BATCH_EXAMPLE["items"]
    ]
    simulator.seed([{**task, "duration": 0} for task in tasks])


def send_as_documented(simulator: SimulatorHandle, example: int) -> requests.Response:
    url, headers, body = vendor_curl_examples()[example]
    headers["authorization"] = headers["authorization"].replace("{token}", "test-token")
    return requests.post(url.replace(VENDOR_BASE, simulator.url), json=body, headers=headers)


def retrieve(simulator: SimulatorHandle, task_id: str, **headers: str) -> requests.Response:
    body = {"id": task_id, "action": "retrieve"}
    return requests.post(f"{simulator.url}/luma/tasks", json=body, headers=headers)


def retrieve_batch(simulator: SimulatorHandle, ids: list[str]) -> dict[str, Any]:
    body = {"ids": ids, "action": "retrieve_batch"}
    answer = requests.post(f"{simulator.url}/luma/tasks", json=body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_the_vendor_page_has_the_examples_this_module_relies_on() -> None:
    examples = vendor_curl_examples()
    assert [body["action"] for _, _, body in examples] == ["retrieve", "retrieve_batch"]
    assert RECORD_EXAMPLE["response"]["state"] == "completed"
    assert BATCH_EXAMPLE["count"] == len(BATCH_EXAMPLE["items"]) == 2
    assert set(ERROR_EXAMPLE) == {"success", "error", "trace_id"}


def test_documented_retrieve_answers_the_documented_record(simulator: SimulatorHandle) -> None:
    seed_vendor_tasks(simulator)
    answer = send_as_documented(simulator, 0)
    assert answer.status_code == 200
    record = answer.json()
    assert shape(record) == shape(RECORD_EXAMPLE)
    assert list(record) == list(RECORD_EXAMPLE)
    assert record["id"] == record["response"]["task_id"] == RECORD_EXAMPLE["id"]
    assert record["response"]["prompt"] == RECORD_EXAMPLE["response"]["prompt"]
    assert re.fullmatch(r"[0-9a-f]{24}", record["_id"])


def test_documented_retrieve_batch_answers_the_documented_items(simulator: SimulatorHandle) -> None:
    seed_vendor_tasks(simulator)
    answer = send_as_documented(simulator, 1)
    assert answer.status_code == 200
    assert shape(answer.json()) == shape(BATCH_EXAMPLE)
    assert [item["id"] for item in answer.json()["items"]] == [
        item["id"] for item in BATCH_EXAMPLE["items"]
    ]


def test_vendor_errors_have_the_documented_shape(simulator: SimulatorHandle) -> None:
    simulator.configure(error_500_share=1.0)
    answer = retrieve(simulator, "any")
    assert answer.status_code == 500
    assert shape(answer.json()) == shape(ERROR_EXAMPLE)
    assert answer.json()["error"] == ERROR_EXAMPLE["error"]


def test_a_task_answers_no_response_then_pending_then_processing(
    simulator: SimulatorHandle,
) -> None:
    """With `age` a task is seeded mid-way: response after 2 s, processing after 5 s."""
    ids = simulator.seed(
        [{"outcome": "completed", "duration": 600, "age": age} for age in (0, 3, 60)]
    )
    records = [retrieve(simulator, task_id).json() for task_id in ids]
    assert "response" not in records[0]
    assert records[1]["response"] == {"success": True, "task_id": ids[1], "state": "pending"}
    assert records[2]["response"] == {"success": True, "task_id": ids[2], "state": "processing"}
    assert not any("finished_at" in record for record in records)
    assert [task_status(record) for record in records] == ["", "", ""]


def test_a_failed_task_answers_success_false_with_its_error(simulator: SimulatorHandle) -> None:
    [task_id] = simulator.seed([{"outcome": "failed", "duration": 0}])
    record = retrieve(simulator, task_id).json()
    assert set(record) == set(RECORD_EXAMPLE)
    response = record["response"]
    assert set(response) == {"success", "task_id", "state", "error"}
    assert (response["success"], response["state"]) == (False, "failed")
    assert set(response["error"]) == {"code", "message"}


def test_a_stalled_task_never_settles(simulator: SimulatorHandle) -> None:
    [task_id] = simulator.seed([{"outcome": "stall", "duration": 1, "age": 3600}])
    record = retrieve(simulator, task_id).json()
    assert record["response"]["state"] == "processing"
    assert "finished_at" not in record


def test_a_generation_call_creates_a_task_that_records_its_request(
    simulator: SimulatorHandle,
) -> None:
    body = {"action": "generate", "prompt": "A lighthouse in a storm"}
    created = requests.post(f"{simulator.url}/luma/videos", json=body).json()
    assert set(created) == {"success", "task_id", "trace_id"}
    record = retrieve(simulator, created["task_id"]).json()
    assert record["request"] == body
    assert record["trace_id"] == created["trace_id"]


def test_finish_settles_a_task_now_and_reports_when(simulator: SimulatorHandle) -> None:
    task_id = simulator.generate()
    before = time.time()
    simulator.finish(task_id, "failed")
    record = retrieve(simulator, task_id).json()
    assert record["response"]["state"] == "failed"
    settled_at = simulator.task(task_id)["settled_at"]
    assert before <= settled_at <= time.time()
    assert record["finished_at"] == round(settled_at, 3)


def test_timing_fields_add_started_at_and_elapsed(simulator: SimulatorHandle) -> None:
    simulator.configure(timing_fields=True)
    [task_id] = simulator.seed([{"outcome": "completed", "duration": 10, "age": 10}])
    record = retrieve(simulator, task_id).json()
    assert record["started_at"] == pytest.approx(record["created_at"] + 1.0, abs=0.01)
    assert record["elapsed"] == pytest.approx(9.0, abs=0.01)


def test_unknown_ids_answer_empty_or_404_and_are_left_out_of_batches(
    simulator: SimulatorHandle,
) -> None:
    [known] = simulator.seed([{"duration": 0}])
    empty = retrieve(simulator, "no-such-task")
    assert (empty.status_code, empty.json()) == (200, {})
    assert [item["id"] for item in retrieve_batch(simulator, ["nope", known])["items"]] == [known]
    simulator.configure(unknown_retrieve="404")
    missing = retrieve(simulator, "no-such-task")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_a_task_of_another_service_is_unknown(simulator: SimulatorHandle) -> None:
    [task_id] = simulator.seed([{"service": "suno", "duration": 0}])
    assert retrieve(simulator, task_id).json() == {}
    body = {"id": task_id, "action": "retrieve"}
    assert requests.post(f"{simulator.url}/suno/tasks", json=body).json()["id"] == task_id


def test_tokens_are_checked_with_the_vendor_401(simulator: SimulatorHandle) -> None:
    simulator.configure(tokens=["good"])
    [task_id] = simulator.seed([{"duration": 0}])
    for headers in ({}, {"authorization": "Bearer bad"}, {"authorization": "good"}):
        answer = retrieve(simulator, task_id, **headers)
        assert answer.status_code == 401
        assert shape(answer.json()) == shape(ERROR_EXAMPLE)
        assert answer.json()["error"]["code"] == "invalid_token"
    assert retrieve(simulator, task_id, authorization="Bearer good").json()["id"] == task_id


def test_injected_429_carries_retry_after(simulator: SimulatorHandle) -> None:
    simulator.configure(error_429_share=1.0, retry_after=7)
    answer = retrieve(simulator, "any")
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "7"
    assert answer.json()["error"]["code"] == "too_many_requests"


def test_injected_faults_come_in_their_share(simulator: SimulatorHandle) -> None:
    simulator.configure(error_429_share=0.3, error_500_share=0.3, seed=7)
    statuses = [retrieve(simulator, "any").status_code for _ in range(200)]
    assert 30 <= statuses.count(429) <= 90
    assert 30 <= statuses.count(500) <= 90
    assert statuses.count(200) == 200 - statuses.count(429) - statuses.count(500)
    assert simulator.stats()["requests_by_status"] == {
        str(status): statuses.count(status) for status in sorted(set(statuses))
    }


def test_an_unknown_action_answers_the_vendor_400(simulator: SimulatorHandle) -> None:
    for body in ({"id": "x", "action": "delete"}, {"action": "retrieve"}, [1, 2]):
        answer = requests.post(f"{simulator.url}/luma/tasks", json=body)
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "bad_request"


def test_batch_cap_drop_share_and_shuffle_shape_batch_answers(simulator: SimulatorHandle) -> None:
    ids = simulator.seed([{"duration": 0}] * 20)
    simulator.configure(batch_cap=5)
    capped = retrieve_batch(simulator, ids)
    assert capped["count"] == len(capped["items"]) == 5
    simulator.configure(batch_cap=None, drop_share=1.0)
    assert retrieve_batch(simulator, ids) == {"items": [], "count": 0}
    simulator.configure(drop_share=0.0, shuffle_batch=True, seed=1)
    shuffled = [item["id"] for item in retrieve_batch(simulator, ids)["items"]]
    assert sorted(shuffled) == sorted(ids)
    assert shuffled != ids
    stats = simulator.stats()
    assert stats["retrieve_batch_calls"] == 3
    assert (stats["items_requested"], stats["items_answered"]) == (60, 25)


def test_rate_limit_answers_429_over_budget_per_token(simulator: SimulatorHandle) -> None:
    simulator.configure(rate_limit_rps=5)
    started = time.monotonic()
    answers = [retrieve(simulator, "any", authorization="Bearer a") for _ in range(12)]
    elapsed = time.monotonic() - started
    other_token = retrieve(simulator, "any", authorization="Bearer b")
    limited = [answer for answer in answers if answer.status_code == 429]
    stats = simulator.stats()
    assert other_token.status_code == 200
    assert stats["over_budget"] == len(limited) >= 12 - 5 * (int(elapsed) + 1)
    assert {answer.headers["retry-after"] for answer in limited} == {"1"}
    assert stats["max_rate_per_second"] >= 6


def test_a_hundred_thousand_tasks_seed_in_one_call(simulator: SimulatorHandle) -> None:
    ids = simulator.seed([{"outcome": "completed", "duration": 0}] * 100_000)
    assert len(set(ids)) == 100_000
    stats = simulator.stats()
    assert stats["tasks"] == stats["tasks_by_phase"]["completed"] == 100_000
    assert retrieve_batch(simulator, ids[-50:])["count"] == 50


def test_reset_forgets_tasks_and_counters_and_restores_knobs(simulator: SimulatorHandle) -> None:
    simulator.configure(batch_cap=1)
    simulator.seed([{"duration": 0}])
    retrieve(simulator, "any")
    simulator.reset()
    stats = simulator.stats()
    assert (stats["tasks"], stats["requests"], stats["requests_by_status"]) == (0, 0, {})
    assert simulator.configure()["batch_cap"] is None


def test_bad_knobs_are_refused_with_422(simulator: SimulatorHandle) -> None:
    for knobs in ({"failure_share": 2}, {"duration_min": 30, "duration_max": 10}, {"nope": 1}):
        answer = requests.put(f"{simulator.url}/_sim/config", json=knobs)
        assert answer.status_code == 422, knobs


def test_the_vendor_sdk_reads_records_and_judges_them_like_the_vendor(
    simulator: SimulatorHandle,
) -> None:
    simulator.configure(tokens=["sdk-token"])
    completed, failed, running = simulator.seed(
        [
            {"outcome": "completed", "duration": 0},
            {"outcome": "failed", "duration": 0},
            {"outcome": "completed", "duration": 600, "age": 60},
        ]
    )
    with AceDataCloud(api_token="sdk-token", base_url=simulator.url, max_retries=0) as client:
        records = [client.tasks.get(i, service="luma") for i in (completed, failed, running)]
    assert [record["id"] for record in records] == [completed, failed, running]
    assert [task_status(record) for record in records] == ["succeeded", "failed", ""]
    with (
        AceDataCloud(api_token="wrong", base_url=simulator.url, max_retries=0) as client,
        pytest.raises(AuthenticationError),
    ):
        client.tasks.get(completed, service="luma")


@pytest.fixture
def simulator_process() -> Iterator[str]:
    """`tracker simulator` run as a user would, with a few flags; its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    flags = ["--token", "a", "--token", "b", "--duration", "2:3", "--batch-cap", "7", "--seed", "5"]
    command = [sys.executable, "-m", "tracker", "simulator", "--port", str(port), *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"{url}/_sim/stats", timeout=1)
                break
            except requests.ConnectionError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "tracker simulator did not start"
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def test_the_simulator_command_serves_with_its_flags(simulator_process: str) -> None:
    config = requests.get(f"{simulator_process}/_sim/config").json()
    assert config["tokens"] == ["a", "b"]
    assert (config["duration_min"], config["duration_max"]) == (2.0, 3.0)
    assert (config["batch_cap"], config["seed"]) == (7, 5)
    refused = requests.post(f"{simulator_process}/luma/videos", json={"prompt": "x"})
    assert refused.status_code == 401
