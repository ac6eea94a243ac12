"""`tracker demo` runs the whole loop on the embedded defaults and exits 0 with a summary;
it shows a Luma video, a Suno song and a Midjourney image with their outputs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.support.processes import descendants, process_table, survivors, wait_until

pytestmark = pytest.mark.slow


def test_demo_completes_with_every_webhook_verified(tmp_path: Path) -> None:
    """...and prints a dashboard link that signs the demo client in, once."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRACKER_")}
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tracker",
            "demo",
            "--tasks",
            "5",
            "--max-duration",
            "3",
            "--stall-timeout",
            "6",
            "--timeout",
            "120",
        ],
        cwd=tmp_path,
        env=env | {"COLUMNS": "160"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert demo.stdout is not None
    head = ""
    for line in demo.stdout:
        head += line
        link = re.search(r"dashboard: (http://[0-9.:]+)(/ui/login\?token=[A-Za-z0-9_-]+)", line)
        if link:
            break
    assert link, head
    browser = requests.Session()
    assert browser.get(link.group(1) + link.group(2), timeout=10).status_code == 200
    overview = browser.get(link.group(1) + "/ui/", timeout=10, allow_redirects=False)
    assert overview.status_code == 200
    assert "demo-" in overview.text
    assert requests.get(link.group(1) + link.group(2), timeout=10).status_code == 401
    try:
        rest, errors = demo.communicate(timeout=180)
    finally:
        demo.kill()
    result = subprocess.CompletedProcess(demo.args, demo.returncode, head + rest, errors)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = re.search(
        r"done: 5 tasks: (\d+) completed, (\d+) failed, (\d+) timed_out; "
        r"(\d+) webhooks received, (\d+) verified",
        result.stdout,
    )
    assert summary, result.stdout[-3000:]
    completed, failed, timed_out, received, verified = map(int, summary.groups())
    assert (completed, failed, timed_out) == (3, 1, 1)
    assert received == verified >= 5
    # A Luma video, a Suno song and a Midjourney image, side by side, with their outputs.
    outputs = result.stdout[result.stdout.index("outputs, one shape") :]
    assert re.search(r"luma +video +https://\S+\.mp4", outputs), outputs
    assert re.search(r"suno +audio +https://cdn1\.suno\.ai/\S+\.mp3", outputs), outputs
    assert re.search(r"midjourney +image +https://\S+\.png", outputs), outputs
    assert "audiopipe" not in outputs  # a preview is never an output
    assert "history of" in result.stdout
    assert "history database:" in result.stdout


def test_sigterm_to_the_demo_stops_the_whole_tree(tmp_path: Path) -> None:
    """One SIGTERM to `tracker demo` ends it and its simulator, API, worker and beat."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRACKER_")}
    out = tmp_path / "demo.out"
    with out.open("wb") as sink:
        parent = subprocess.Popen(
            [sys.executable, "-m", "tracker", "demo", "--timeout", "120"],
            cwd=tmp_path,
            env=env | {"COLUMNS": "160"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tree: set[int] = set()
    try:
        wait_until(lambda: "receiver http" in out.read_text(), timeout=60, what="the demo up")
        tree = descendants(parent.pid)
        assert len(tree) >= 4, tree  # simulator, api, worker, beat
        groups = {process_table()[pid][1] for pid in tree} | {parent.pid}

        parent.send_signal(signal.SIGTERM)

        parent.wait(60)
        wait_until(lambda: not survivors(tree, groups), timeout=5, what="no survivor")
    finally:
        for pid in {parent.pid} | survivors(tree, set()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        parent.wait(30)
