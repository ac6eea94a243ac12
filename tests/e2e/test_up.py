"""`tracker up` as a user runs it: a real process tree (API, worker, beat)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.processes import descendants, process_table, survivors, wait_until
from tracker.devtools.demo import free_port

pytestmark = pytest.mark.slow

MISSING_TOKEN = "TRACKER_UPSTREAM_TOKEN is not set"


def up_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The user's environment, without TRACKER_* of the machine, on a private SQLite."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TRACKER_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    return (
        env
        | {
            "TRACKER_DATABASE_URL": f"sqlite:///{tmp_path / 'tracker.db'}",
            "TRACKER_API_PORT": str(free_port()),
            "TRACKER_METRICS_PORT": "0",
            "TRACKER_UPSTREAM_URL": "http://127.0.0.1:9",  # nothing listens: no real upstream
            "TRACKER_LOG_FORMAT": "json",
            "PROMETHEUS_MULTIPROC_DIR": "",
        }
        | extra
    )


@contextlib.contextmanager
def tracker_up(
    tmp_path: Path, env: dict[str, str], *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`tracker up ARGS` in its own process group, its output in tmp_path/up.log; the
    whole group is SIGKILLed at the end, whatever the test did."""
    log = (tmp_path / "up.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "tracker", "up", *args],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        tree = descendants(process.pid) if process.poll() is None else set()
        for pid in {process.pid} | tree:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        process.wait(30)
        log.close()


def output(tmp_path: Path) -> str:
    return (tmp_path / "up.log").read_text(errors="replace")


@pytest.mark.parametrize("token", ["", None])
def test_up_warns_when_the_upstream_token_is_empty_or_unset(
    tmp_path: Path, token: str | None
) -> None:
    extra = {} if token is None else {"TRACKER_UPSTREAM_TOKEN": token}
    with tracker_up(tmp_path, up_env(tmp_path, **extra)):
        wait_until(lambda: "stops everything" in output(tmp_path), timeout=60, what="up")
    assert MISSING_TOKEN in output(tmp_path)


def test_up_does_not_warn_with_a_token(tmp_path: Path) -> None:
    with tracker_up(tmp_path, up_env(tmp_path, TRACKER_UPSTREAM_TOKEN="a-token")):
        wait_until(lambda: "stops everything" in output(tmp_path), timeout=60, what="up")
    assert MISSING_TOKEN not in output(tmp_path)


def _api_answers(port: str) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _at_least(count: int, pids: set[int]) -> set[int] | None:
    return pids if len(pids) >= count else None


def test_sigterm_to_up_stops_the_whole_tree(tmp_path: Path) -> None:
    """As a supervisor or `timeout` does it: one SIGTERM to the parent only; no child, and
    nothing in a child's process group, survives it."""
    env = up_env(tmp_path, TRACKER_UPSTREAM_TOKEN="a-token")
    with tracker_up(tmp_path, env) as parent:
        wait_until(lambda: _api_answers(env["TRACKER_API_PORT"]), timeout=60, what="the API")
        tree = wait_until(
            lambda: _at_least(3, descendants(parent.pid)), timeout=30, what="api, worker, beat"
        )
        groups = {process_table()[pid][1] for pid in tree} | {parent.pid}

        parent.send_signal(signal.SIGTERM)

        code = parent.wait(60)
        wait_until(lambda: not survivors(tree, groups), timeout=5, what="no survivor")
        assert code == 0
    assert "stopping" in output(tmp_path)
