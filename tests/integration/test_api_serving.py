"""The API as served: liveness under load, several processes, request metrics.

A real uvicorn on loopback (in a thread, or `tracker api` as a process), real HTTP.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.processes import descendants, wait_until
from tracker.api import create_app
from tracker.api.app import API_THREADS
from tracker.config import Settings
from tracker.devtools.demo import free_port
from tracker.tracking.clients import NewClient

SLOW_SECONDS = 1.5


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """`app` served by uvicorn on 127.0.0.1 from a thread; its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.started, timeout=20, interval=0.05, what="uvicorn")
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def test_healthz_answers_at_once_while_every_request_thread_is_busy(settings: Settings) -> None:
    """A liveness probe must not queue behind slow work for one of the request threads."""
    app = create_app(settings)
    started = threading.Semaphore(0)

    @app.get("/slow")
    def slow() -> dict[str, str]:  # sync: runs in one of the API_THREADS request threads
        started.release()
        time.sleep(SLOW_SECONDS)
        return {"status": "done"}

    with serving(app) as url, ThreadPoolExecutor(API_THREADS + 1) as pool:
        busy = [
            pool.submit(requests.get, f"{url}/slow", timeout=30) for _ in range(API_THREADS + 1)
        ]
        for _ in range(API_THREADS):  # every request thread is in a slow request
            assert started.acquire(timeout=10)
        before = time.perf_counter()
        answer = requests.get(f"{url}/healthz", timeout=30)
        took = time.perf_counter() - before
        assert all(f.result().status_code == 200 for f in busy)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}
    assert took < 0.5, f"/healthz took {took:.2f} s behind the slow requests"


def metric_samples(text: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric in Prometheus text."""
    found = {}
    for line in text.splitlines():
        match = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def test_requests_are_counted_and_timed_by_route_template_and_status(
    api: TestClient, auth: dict[str, str], client: NewClient
) -> None:
    """Labels are the route template, never the raw path: ids do not make new series."""
    for task_id in ("a1", "b2", "c3"):
        api.get(f"/v1/tasks/{task_id}", headers=auth)  # 404: no such task
    api.get("/v1/tasks", headers=auth)
    api.get("/no/such/route/1")
    api.get("/no/such/route/2")
    api.request("FROBNICATE", "/v1/tasks", headers=auth)

    text = api.get("/metrics").text

    counts = metric_samples(text, "tracker_api_requests_total")
    assert counts['method="GET",route="/v1/tasks/{task_id}",status="404"'] >= 3
    assert counts['method="GET",route="/v1/tasks",status="200"'] >= 1
    assert counts['method="GET",route="unmatched",status="404"'] >= 2
    assert counts['method="other",route="/v1/tasks",status="405"'] >= 1
    assert not [labels for labels in counts if "a1" in labels or "/no/such" in labels]
    latency = metric_samples(text, "tracker_api_request_seconds_count")
    assert latency['method="GET",route="/v1/tasks/{task_id}",status="404"'] >= 3


def test_tracker_api_serves_with_several_processes_and_merges_their_metrics(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACKER_", "PROMETHEUS_"))}
    env |= {"TRACKER_DATABASE_URL": settings.database_url, "TRACKER_LOG_FORMAT": "json"}
    log = (tmp_path / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", "tracker", "api", "--port", str(port), "--workers", "2"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{url}/healthz"), timeout=60, what="the API")
        assert len(descendants(api.pid)) >= 2  # the two serving processes
        for _ in range(20):
            with requests.Session() as fresh:  # a new connection each: spread over both
                assert fresh.get(f"{url}/healthz", timeout=10).status_code == 200
        text = requests.get(f"{url}/metrics", timeout=10).text
        counts = metric_samples(text, "tracker_api_requests_total")
        # Every process's count, whichever process answers the scrape.
        assert counts['method="GET",route="/healthz",status="200"'] >= 21
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(api.pid, signal.SIGTERM)
        try:
            api.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(api.pid, signal.SIGKILL)
            api.wait(10)
        log.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(autouse=True)
def _no_stray_metrics_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
