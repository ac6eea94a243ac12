"""Real tracker roles for the end-to-end benchmarks: worker, beat and API processes, their RSS.

The worker and the beat run as `tracker worker` / `tracker beat` children of a
`tracker.worker.roles.Supervisor`, configured only through `TRACKER_*` variables, with
a Redis database of their own as broker (`TRACKER_BENCH_BROKER_URL`, default
`redis://127.0.0.1:6379/7`; emptied before each run). Peak memory is the
kernel's high-water mark (VmHWM in /proc/PID/status) of each process; children
a process forked (none with the worker's default threads pool) are added.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import redis
import requests
from sqlalchemy.orm import Session, sessionmaker

from bench.common import receiver_subprocess
from tracker.api.tasks import MAX_BATCH
from tracker.tracking.clients import create_client
from tracker.worker.roles import Supervisor

ROOT = Path(__file__).resolve().parent.parent
BROKER_URL = os.environ.get("TRACKER_BENCH_BROKER_URL", "redis://127.0.0.1:6379/7")


def tracker_env(db_url: str, sim_url: str, **settings: object) -> dict[str, str]:
    """The environment of tracker processes on the bench's database, simulator and broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env.update(
        TRACKER_DATABASE_URL=db_url,
        TRACKER_BROKER_URL=BROKER_URL,
        TRACKER_UPSTREAM_URL=sim_url,
        TRACKER_WEBHOOK_ALLOW_PRIVATE="true",  # the receiver listens on loopback
        TRACKER_METRICS_PORT="0",
        TRACKER_LOG_FORMAT="json",
    )
    env.update({f"TRACKER_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def empty_broker() -> None:
    """Forget queued messages and budget keys of earlier runs (the bench's own database)."""
    connection = redis.Redis.from_url(BROKER_URL)
    try:
        connection.flushdb()
    finally:
        connection.close()


@contextmanager
def worker_and_beat(env: Mapping[str, str], log_dir: Path) -> Iterator[Supervisor]:
    """`tracker worker` (default concurrency) and `tracker beat`, stopped on the way out."""
    empty_broker()
    supervisor = Supervisor(env=env, log_dir=log_dir)
    supervisor.start("worker", ["worker"])
    supervisor.start("beat", ["beat"])
    try:
        yield supervisor
    finally:
        supervisor.stop(timeout=15)
        empty_broker()


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as children:
                found += [int(c) for c in children.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


class PeakRss:
    """Samples the peak RSS of processes (VmHWM, plus their children's) until stopped."""

    def __init__(self, pids: Mapping[str, int], interval: float = 0.5) -> None:
        self.pids = dict(pids)
        self.peak_kb = dict.fromkeys(self.pids, 0)
        self.children_seen = dict.fromkeys(self.pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), name="rss", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            children = _children(pid)
            self.children_seen[name] = max(self.children_seen[name], len(children))
            total = _status_kb(pid, "VmHWM") + sum(_status_kb(c, "VmHWM") for c in children)
            self.peak_kb[name] = max(self.peak_kb[name], total)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def stop(self) -> dict[str, float]:
        """Stop sampling (one last sample first); peak MiB by name."""
        self.sample()
        self._stop.set()
        self._thread.join()
        return {name: kb / 1024 for name, kb in self.peak_kb.items()}


@contextmanager
def arrivals_receiver() -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """A webhook receiver (`tests.support.receiver`, 200 at once) in its own process.

    Yields the hook URL and a list that is filled on the way out with
    (task id, wall-clock arrival time) of every webhook received.
    """
    after = (
        "import json, time; offset = time.time() - time.monotonic(); "
        "print(json.dumps([[json.loads(q.body)['data']['task_id'], q.at + offset] "
        "for q in r.requests]), flush=True)"
    )
    arrivals: list[tuple[str, float]] = []
    with receiver_subprocess(after) as (hook, output):
        yield hook, arrivals
    arrivals += [(task_id, at) for task_id, at in json.loads(output[0] or "[]")]


def log_dir(prefix: str) -> Path:
    """A fresh directory for the children's logs (kept, to read after a failing run)."""
    return Path(tempfile.mkdtemp(prefix=f"tracker-bench-{prefix}-"))


def wait_for(probe: object, *, timeout: float, interval: float = 0.5) -> bool:
    """Call `probe` until it returns something truthy or `timeout` passes; whether it did."""
    assert callable(probe)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(interval)
    return bool(probe())


def new_api_key(sessions: sessionmaker[Session], name: str) -> str:
    """A new client's API key."""
    with sessions() as session, session.begin():
        return create_client(session, name).api_key


def register_batches(
    http: requests.Session, base_url: str, registrations: list[dict[str, object]]
) -> list[float]:
    """Register through `POST /v1/tasks/batch`, MAX_BATCH a request; each request's seconds."""
    times = []
    for start in range(0, len(registrations), MAX_BATCH):
        chunk = registrations[start : start + MAX_BATCH]
        began = time.perf_counter()
        answer = http.post(f"{base_url}/v1/tasks/batch", json={"tasks": chunk}, timeout=120)
        times.append(time.perf_counter() - began)
        answer.raise_for_status()
        statuses = {item["status"] for item in answer.json()["items"]}
        if statuses != {201}:
            raise RuntimeError(f"batch registration answered item statuses {sorted(statuses)}")
    return times


PY_SPY = Path(sys.executable).with_name("py-spy")
# Frames every sample passes through (start-up, CLI, thread bootstrap): not worth a line.
NOISE = ("runpy", "typer", "click", "threading.py", "celery/bin", "__main__", "asyncio/runners")


def pid_of(*words: str) -> int:
    """The process whose command line holds every one of `words`."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    argv = cmdline.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if all(word in argv for word in words):
                return int(entry)
    raise LookupError(f"no process runs with {words}")


class Spy:
    """`py-spy record` of a process (CPU samples holding the GIL), if py-spy is installed.

    py-spy comes with the dev extra; without it, or without ptrace rights, `text`
    says why there is no profile.
    """

    def __init__(self, pid: int, seconds: float, label: str) -> None:
        self.label = label
        self.output = log_dir("spy") / "samples.txt"
        self.process: subprocess.Popen[bytes] | None = None
        if PY_SPY.exists():
            self.process = subprocess.Popen(
                [
                    *(str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(seconds))),
                    *("--rate", "100", "--gil", "--nonblocking", "--format", "raw"),
                    *("--output", str(self.output)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=self.output.with_suffix(".err").open("wb"),
            )

    def text(self, top: int = 25) -> str:
        """Own and inclusive sample counts of the busiest functions."""
        if self.process is None:
            return f"no profile of {self.label}: py-spy is not installed (pip install -e .[dev])"
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if not self.output.exists():
            errors = self.output.with_suffix(".err").read_text(errors="replace").strip()
            return f"no profile of {self.label}: py-spy failed: {errors[-300:]}"
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for line in self.output.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue  # a line cut short when py-spy was stopped
            frames = stack.split(";")
            total += int(count)
            own[frames[-1]] += int(count)
            for frame in set(frames):
                if not any(noise in frame for noise in NOISE):
                    inclusive[frame] += int(count)
        root = str(ROOT) + "/"
        site = str(ROOT / ".venv/lib/python3.11/site-packages") + "/"

        def rows(counter: Counter[str]) -> list[str]:
            return [
                f"{n:7d} {100 * n / max(total, 1):5.1f}%  {f.replace(site, '').replace(root, '')}"
                for f, n in counter.most_common(top)
            ]

        return "\n".join(
            [
                f"py-spy of {self.label}: {total} samples holding the GIL",
                "own:",
                *rows(own),
                "inclusive:",
                *rows(inclusive),
            ]
        )
