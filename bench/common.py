"""What every benchmark of the suite shares: a private database, seeding, helper processes, figures.

The database conventions are `bench/list_pages.py`'s: a fresh PostgreSQL database
created and migrated with `tracker.db.migrate.upgrade`, filled with COPY, dropped
afterwards. The simulator and the webhook receiver run in processes of their
own, so they do not share the measured process's interpreter lock.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import requests
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from bench.list_pages import SCHEDULE_NEW_TASKS, private_database
from tracker.clock import utcnow
from tracker.tracking.clients import create_client

__all__ = ["Figure", "private_database", "receiver_process", "seed_tasks", "simulator_process"]

EVENTS = json.dumps(["task.completed", "task.failed", "task.timed_out"])
TASK_COLUMNS = (
    "client_id, task_id, service, state, upstream_state, callback_url, metadata, events, "
    "timeout_seconds, created_at, updated_at, finished_at, deadline_at, "
    "failure_code, failure_message, record"
)


@dataclass(frozen=True)
class Figure:
    """One measured figure, its target and the baseline it is compared with."""

    name: str
    value: float
    unit: str
    target: str
    passed: bool | None  # None: informative, no target
    baseline: float | None = None
    baseline_name: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.baseline else self.value / self.baseline

    def line(self) -> str:
        ratio = "" if self.ratio is None else f"{self.ratio:6.3f} x {self.baseline_name}"
        verdict = {True: "PASS", False: "FAIL", None: "info"}[self.passed]
        return (
            f"{self.name:<58} {self.value:>12,.{3 if self.unit == 'x' else 1}f} {self.unit:<8} "
            f"target {self.target:<22} {ratio:<34} {verdict}"
        )


def profile_text(profiler: cProfile.Profile, focus: str) -> str:
    """Top 10 functions by own time, and the top 15 matching `focus` by cumulative time."""
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(10)
    stats.sort_stats("cumulative").print_stats(focus, 15)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return (
        out.getvalue()
        .replace(root + "/.venv/lib/python3.11/site-packages/", "")
        .replace(root + "/", "")
    )


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat).

    The difference over a run is what the run cost the whole machine: the measured
    process, PostgreSQL, the simulator, the broker, and anything else running.
    """
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal


def cpu_by_role() -> dict[str, float]:
    """CPU seconds used so far by the processes alive now, by role: postgres, redis,
    worker, simulator, this process (bench), other. Differences over a run split
    `machine_busy_seconds` between them (processes that ended meanwhile are missed)."""
    ticks = os.sysconf("SC_CLK_TCK")
    roles: dict[str, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        role = _role(int(entry.name), command)
        roles[role] = roles.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return roles  # fields 11, 12: utime, stime


def _role(pid: int, command: str) -> str:
    if pid == os.getpid():
        return "bench"
    for role, marks in [
        ("postgres", ("postgres",)),
        ("redis", ("redis-server",)),
        ("worker", ("tracker worker", "tracker.worker.roles worker")),
        ("simulator", ("simulator",)),
    ]:
        if any(mark in command for mark in marks):
            return role
    return "other"


@dataclass(frozen=True)
class CpuCost:
    """Machine CPU seconds per unit of work over a stretch of time, and its split by role."""

    total: float
    by_role: dict[str, float]


class CpuMeter:
    """`meter = CpuMeter()`, the work, then `meter.per(units)`: what each unit cost."""

    def __init__(self) -> None:
        self.busy, self.roles = machine_busy_seconds(), cpu_by_role()

    def per(self, units: int) -> CpuCost:
        busy, roles = machine_busy_seconds(), cpu_by_role()
        return CpuCost(
            (busy - self.busy) / units,
            {role: (used - self.roles.get(role, 0.0)) / units for role, used in roles.items()},
        )


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def plain_url(url: str) -> str:
    """The psycopg URL of a SQLAlchemy URL (no `+driver`)."""
    return sa.engine.make_url(url).set(drivername="postgresql").render_as_string(False)


def seed_clients(sessions: sessionmaker[Session], count: int, prefix: str) -> list[int]:
    """`count` clients; their ids."""
    with sessions() as session, session.begin():
        return [create_client(session, f"{prefix}-{n}").client.id for n in range(count)]


def seed_tasks(
    url: str,
    registrations: Sequence[tuple[int, str]],
    *,
    state: str,
    upstream_state: str | None,
    callback_url: str,
    service: str = "luma",
) -> None:
    """Active registrations (client id, upstream id), due a second ago, with COPY."""
    now = utcnow()
    created = now - timedelta(seconds=10)
    with psycopg.connect(plain_url(url)) as conn, conn.cursor() as cursor:
        with cursor.copy(f"COPY tasks ({TASK_COLUMNS}) FROM STDIN") as copy:
            for n, (client_id, task_id) in enumerate(registrations):
                copy.write_row(
                    (
                        client_id,
                        task_id,
                        service,
                        state,
                        upstream_state,
                        callback_url,
                        f'{{"order": {n}}}',
                        EVENTS,
                        86400,
                        created,
                        created,
                        None,
                        now + timedelta(days=1),
                        None,
                        None,
                        None,
                    )
                )
        conn.execute(SCHEDULE_NEW_TASKS, {"due_at": now - timedelta(seconds=1), "polls": 0})
        conn.execute("ANALYZE tasks")
        conn.execute("ANALYZE task_schedule")
        conn.commit()


def clear_tasks(url: str) -> None:
    """Forget every registration (their history and deliveries go with them)."""
    with psycopg.connect(plain_url(url)) as conn:
        conn.execute("TRUNCATE tasks CASCADE")


def make_due_again(url: str, when: datetime) -> None:
    """Every active registration due again at `when`, no lease: the next run starts equal."""
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        conn.execute(
            "UPDATE task_schedule SET next_poll_at = %s, claimed_until = NULL, polls = 0, "
            "misses = 0 FROM tasks WHERE tasks.id = task_schedule.task_row_id "
            "AND tasks.state IN ('pending', 'running')",
            (when,),
        )
        conn.execute("VACUUM ANALYZE task_schedule")


def settle_database(url: str) -> None:
    """Let the server catch up with the writes of what ran before: vacuum and analyze every
    table, then write a checkpoint, so that neither autovacuum nor a checkpoint's flush
    starts inside the next measurement."""
    with psycopg.connect(plain_url(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def simulator_process() -> Iterator[str]:
    """`tracker simulator` in its own process on a free loopback port; its base URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tracker", "simulator", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(f"{base_url}/_sim/stats")
        yield base_url
    finally:
        server.terminate()
        server.wait(10)


@contextmanager
def receiver_subprocess(after: str = "") -> Iterator[tuple[str, list[str]]]:
    """`tests.support.receiver.Receiver` (200 at once) in its own process: the hook URL, its output.

    `after` is Python run once the receiver is closed (its `Receiver` is `r`); what it
    prints is put in the yielded list on the way out.
    """
    code = (
        "import sys; from tests.support.receiver import Receiver; r = Receiver(); "
        "print(r.port, flush=True); sys.stdin.read(); r.close(); " + after
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    server = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    assert server.stdout is not None
    assert server.stdin is not None
    port = int(server.stdout.readline())
    output: list[str] = []
    try:
        yield f"http://127.0.0.1:{port}/hook", output
    finally:
        server.stdin.close()
        output.append(server.stdout.read())
        server.wait(10)


@contextmanager
def receiver_process() -> Iterator[str]:
    """A receiver in its own process (`receiver_subprocess`); the hook URL."""
    with receiver_subprocess() as (hook, _):
        yield hook


def _wait_until_up(url: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers at {url} after 20 s") from None
            time.sleep(0.1)


def seed_simulator(base_url: str, count: int, *, chunk: int = 20_000) -> list[str]:
    """`count` running tasks in the simulator (settling in a day); their ids."""
    ids: list[str] = []
    while len(ids) < count:
        size = min(chunk, count - len(ids))
        seeds = [{"outcome": "completed", "duration": 86400, "age": 10}] * size
        answer = requests.post(f"{base_url}/_sim/tasks", json={"tasks": seeds}, timeout=120)
        answer.raise_for_status()
        ids += answer.json()["ids"]
    return ids


def simulator_stats(base_url: str) -> dict[str, int]:
    stats: dict[str, int] = requests.get(f"{base_url}/_sim/stats", timeout=10).json()
    return stats


def configure_simulator(base_url: str, **knobs: object) -> None:
    requests.put(f"{base_url}/_sim/config", json=knobs, timeout=10).raise_for_status()


def reset_simulator(base_url: str) -> None:
    requests.post(f"{base_url}/_sim/reset", timeout=30).raise_for_status()


@contextmanager
def api_process(env: Mapping[str, str], port: int, log_path: Path | str) -> Iterator[str]:
    """`tracker api` in its own process with `env` on `port`, logging to `log_path`; its base
    URL once it answers `/healthz` (or after 20 s)."""
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tracker", "api", "--port", str(port)],
            env=dict(env),
            stdout=log,
            stderr=log,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                requests.get(f"{base_url}/healthz", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield base_url
    finally:
        server.terminate()
        server.wait(10)
