"""Running the service's roles: worker, beat, and all of them at once for `tracker up`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tracker.celery_app import DELIVERY_QUEUE, POLL_QUEUE, SCHEDULE_QUEUE

ALL_QUEUES = (SCHEDULE_QUEUE, POLL_QUEUE, DELIVERY_QUEUE)
# Worker threads: jobs wait on the network (upstream, receivers), rarely on the CPU.
DEFAULT_CONCURRENCY = 16


def run_worker(
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    pool: str = "threads",
    queues: Sequence[str] = ALL_QUEUES,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> None:
    """Run a Celery worker in this process until it is stopped."""
    from tracker.celery_app import celery_app

    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)


def run_beat(*, loglevel: str = "INFO", schedule_file: Path | None = None) -> None:
    """Run Celery beat in this process until it is stopped."""
    from tracker.celery_app import celery_app

    schedule = schedule_file or Path(tempfile.gettempdir()) / f"tracker-beat-{os.getpid()}"
    celery_app.start(["beat", f"--loglevel={loglevel}", f"--schedule={schedule}"])


@dataclass
class Supervisor:
    """Child processes started together and stopped together (Ctrl-C stops them all)."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    log_dir: Path | None = None  # None: children write to this terminal
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, args: Sequence[str]) -> None:
        """Start `tracker ARGS` as child `name` (its output to log_dir/NAME.log, if set)."""
        output = (self.log_dir / f"{name}.log").open("ab") if self.log_dir else None
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "tracker", *args],
            env=dict(self.env),
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )

    def first_exit(self) -> str | None:
        """The name of a child that has exited, if any."""
        return next((n for n, p in self.children.items() if p.poll() is not None), None)

    def wait(self) -> str:
        """Block until a child exits (or Ctrl-C); returns its name."""
        while (name := self.first_exit()) is None:
            time.sleep(0.5)
        return name

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child, then SIGKILL those still running after `timeout`."""
        for process in self.children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.children.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.wait(remaining)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
