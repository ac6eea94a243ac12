"""An upstream answering 429 with an absurd `Retry-After` pauses polling for at most
TRACKER_MAX_POLL_INTERVAL: real worker and beat processes, the simulator as upstream."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.test_polling import all_terminal, register_all, tracker_env
from tests.support.processes import TrackerProcesses, wait_until
from tests.support.sim import SimulatorHandle
from tracker.config import load_settings

pytestmark = pytest.mark.slow

# A year in seconds, and a date far in the future: each paused the token for as long.
ABSURD = ["31536000", "Fri, 31 Dec 9999 23:59:59 GMT"]


@pytest.mark.parametrize("retry_after", ABSURD)
def test_polling_resumes_within_the_max_poll_interval_after_an_absurd_retry_after(
    pg_url: str,
    broker: str,
    simulator: SimulatorHandle,
    tmp_path: Path,
    retry_after: str,
) -> None:
    simulator.configure(error_429_share=1.0, retry_after=retry_after)
    ids = simulator.seed([{"outcome": "completed", "duration": 0}] * 20)
    register_all(pg_url, load_settings(upstream_token="test-token", _env_file=None), ids)
    env = tracker_env(pg_url, simulator, broker)  # TRACKER_MAX_POLL_INTERVAL=2
    group = TrackerProcesses(env, tmp_path)
    try:
        group.worker()
        group.beat()
        _check_polling_resumes(simulator, group, pg_url)
    finally:
        group.stop_all()


def _check_polling_resumes(
    simulator: SimulatorHandle, group: TrackerProcesses, db_url: str
) -> None:
    wait_until(
        lambda: simulator.stats()["requests_by_status"].get("429", 0) >= 1,
        timeout=60,
        what="the upstream's first 429",
    )
    simulator.configure(error_429_share=0.0)
    healed = time.monotonic()
    try:
        # The bound (2 s), a tick and a poll, with room for a loaded machine.
        wait_until(lambda: all_terminal(db_url), timeout=15, what="every task terminal")
    except AssertionError:
        print(group.logs())
        raise
    assert time.monotonic() - healed < 15
    assert "clamped to 2 s (TRACKER_MAX_POLL_INTERVAL)" in group.logs(tail=400)
