"""Real tracker processes for end-to-end tests: workers and beats started, killed, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class TrackerProcesses:
    """`tracker worker` / `tracker beat` child processes sharing one environment."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.env = {**os.environ, **env}
        self.workdir = workdir
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._count = 0

    def start(self, role: str, *args: str, name: str | None = None) -> str:
        """Start `tracker ROLE ARGS`; returns its name (for `kill`), logs go to workdir."""
        self._count += 1
        name = name or f"{role}-{self._count}"
        log = (self.workdir / f"{name}.log").open("ab")
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "tracker", role, *args],
            env=self.env,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return name

    def worker(self, *args: str, concurrency: int = 8) -> str:
        return self.start("worker", f"--concurrency={concurrency}", *args)

    def beat(self) -> str:
        return self.start("beat")

    def kill(self, name: str, sig: int = signal.SIGKILL, *, grace: float = 30.0) -> None:
        """Send `sig` to the child's process group; SIGKILL it if it is not gone in `grace` s
        (a worker asked to stop finishes its jobs first, and one may be waiting for a
        database that is down)."""
        process = self.children.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)

    def alive(self, name: str) -> bool:
        return self.children[name].poll() is None

    def stop_all(self) -> None:
        for name in list(self.children):
            self.kill(name, signal.SIGTERM if self.alive(name) else signal.SIGKILL)

    def logs(self, tail: int = 60) -> str:
        """The last lines of every child's log, to explain a failing test."""
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"==== {path.name}\n" + "\n".join(lines))
        return "\n".join(out)


def wait_until(
    probe: Callable[[], T], *, timeout: float, interval: float = 0.25, what: str = "condition"
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what} (last: {value!r})"
            )
        time.sleep(interval)
