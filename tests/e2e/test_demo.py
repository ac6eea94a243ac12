"""`tracker demo` runs the whole loop on the embedded defaults and exits 0 with a summary;
it shows a Luma video, a Suno song and a Midjourney image with their outputs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_completes_with_every_webhook_verified(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRACKER_")}
    result = subprocess.run(
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
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
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
