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


def process_table() -> dict[int, tuple[int, int, str]]:
    """Every live process on this machine (Linux `/proc`): pid -> (parent pid, process
    group, state letter); zombies (state Z) are left out, they run nothing."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # "pid (command) state ppid pgrp ...": the command may hold spaces and parentheses.
        state, ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if state != "Z":
            table[int(entry.name)] = (int(ppid), int(pgrp), state)
    return table


def descendants(pid: int) -> set[int]:
    """The live processes below `pid`: its children, theirs, and so on."""
    table = process_table()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, (ppid, _, _) in table.items() if ppid in frontier}
        frontier -= found
        found |= frontier
    return found


def survivors(pids: set[int], groups: set[int]) -> set[int]:
    """Those of `pids` still alive, and any live process in one of the process `groups`."""
    return {pid for pid, (_, pgrp, _) in process_table().items() if pid in pids or pgrp in groups}
