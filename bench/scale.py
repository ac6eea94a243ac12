"""Benchmark 5: scale and memory with 100,000 outstanding tasks; the registration API under load.

Memory: 100,000 running tasks are seeded in the simulator and, with COPY, in
PostgreSQL (one client, due at once). Real `tracker worker` (default: 16
threads) and `tracker beat` processes poll them until `cycles` full poll
cycles have been asked of the simulator; the peak RSS of each is the kernel's
high-water mark (VmHWM; the threads pool forks no children, any would be
added). The upstream budget is raised (`TRACKER_UPSTREAM_RPS`, stated in the
figure) so that a cycle is bound by the worker, not by the budget, and one
tick claims as much as it ever does.

API: `tracker api` in its own process, on the same database (100,000 tasks
already in it). An open-loop generator (a clock thread, 32 threads with keep-alive
connections) sends `POST /v1/tasks` at 200 requests/s for 30 s, each a new task; latency is
counted from the moment each request was due, so a stalled server cannot hide
its queue. The floor is `GET /healthz` at the same rate. Then the batch
endpoint registers 1000 tasks a request, one request after another.
"""

from __future__ import annotations

import http.client
import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from sqlalchemy.orm import sessionmaker

from bench.common import (
    Figure,
    clear_tasks,
    reset_simulator,
    seed_clients,
    seed_simulator,
    seed_tasks,
    settle_database,
    simulator_stats,
)
from bench.list_pages import server_side_times, serving
from bench.polling import running_upstream_state
from bench.roles import (
    PeakRss,
    Spy,
    log_dir,
    new_api_key,
    pid_of,
    register_batches,
    tracker_env,
    wait_for,
    worker_and_beat,
)
from tracker.db.engine import make_engine

TARGET_RSS_MB = 300.0
TARGET_P99_MS = 50.0
CALLBACK = "https://hooks.example.com/tracker"
SCALE_RPS = 200  # upstream requests/s allowed in the memory run: 10,000 ids/s, 50,000 a tick
CYCLE_TIMEOUT = 150.0  # seconds allowed for each full poll cycle
REQUEST_TIMEOUT = 5.0  # seconds after it was due that a request counts as failed
CONNECTIONS = 32  # of the load generator, each kept alive by one thread
WARM_UP_SECONDS = 2.0  # of registrations at the load's rate before the measured run
JSON = {"Content-Type": "application/json"}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)] if ordered else math.inf


def memory(db_url: str, sim_url: str, *, tasks: int = 100_000, cycles: int = 2) -> list[Figure]:
    """Peak RSS of a real worker and beat over `cycles` full poll cycles of `tasks`."""
    clear_tasks(db_url)
    reset_simulator(sim_url)
    ids = seed_simulator(sim_url, tasks)
    engine = make_engine(db_url)
    (client_id,) = seed_clients(sessionmaker(bind=engine), 1, f"scale-{uuid.uuid4().hex[:8]}")
    engine.dispose()
    state, upstream_state = running_upstream_state(sim_url, ids[0])
    seed_tasks(
        db_url,
        [(client_id, task_id) for task_id in ids],
        state=state,
        upstream_state=upstream_state,
        callback_url=CALLBACK,
    )
    env = tracker_env(db_url, sim_url, upstream_rps=SCALE_RPS)
    before = simulator_stats(sim_url)["items_requested"]

    def asked() -> float:
        return float(simulator_stats(sim_url)["items_requested"] - before)

    with worker_and_beat(env, log_dir("scale")) as roles:
        sampler = PeakRss({name: child.pid for name, child in roles.children.items()})
        started = time.perf_counter()
        wait_for(lambda: asked() >= cycles * tasks, timeout=cycles * CYCLE_TIMEOUT, interval=1)
        elapsed = time.perf_counter() - started
        polled = asked()
        peaks = sampler.stop()
        forked = max(sampler.children_seen.values())
    label = f"scale {tasks:,} outstanding, {SCALE_RPS} rps"
    done = polled / tasks
    rss_target = f"< {TARGET_RSS_MB:g} MB"
    note = "" if forked == 0 else f" (+{forked} children)"
    return [
        Figure(f"{label}: full poll cycles", done, "cycles", f">= {cycles}", done >= cycles),
        Figure(f"{label}: worker ids polled/s", polled / elapsed, "ids/s", "(informative)", None),
        Figure(
            f"{label}: peak RSS worker{note}",
            peaks["worker"],
            "MB",
            rss_target,
            peaks["worker"] < TARGET_RSS_MB,
        ),
        Figure(
            f"{label}: peak RSS beat",
            peaks["beat"],
            "MB",
            rss_target,
            peaks["beat"] < TARGET_RSS_MB,
        ),
    ]


@dataclass
class Load:
    """What an open-loop run saw: latency of each request (s, from when it was due), errors."""

    latencies: list[float]
    errors: int
    elapsed: float

    @property
    def rate(self) -> float:
        """Requests answered successfully per second."""
        return (len(self.latencies) - self.errors) / self.elapsed


def open_loop(
    base_url: str,
    headers: dict[str, str],
    request: Callable[[int], tuple[str, str, Any]],
    *,
    rate: float,
    seconds: float,
) -> Load:
    """Send `request(n)` (method, path, JSON body) at `rate` per second for `seconds`.

    A clock thread queues each request at its due time; `CONNECTIONS` threads,
    each with one keep-alive connection, send them. Latency runs from the due
    time, so time spent queued behind a slow server counts. A request still
    unsent `REQUEST_TIMEOUT` seconds after it was due, or unanswered by then, is
    an error with that latency: an overloaded server ends the run in bounded time.
    """
    count = int(rate * seconds)
    due_queue: queue.SimpleQueue[tuple[int, float] | None] = queue.SimpleQueue()
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    address = urlsplit(base_url)

    def send() -> None:
        conn = http.client.HTTPConnection(address.hostname, address.port, timeout=REQUEST_TIMEOUT)
        while (item := due_queue.get()) is not None:
            n, due = item
            method, path, body = request(n)
            failed = time.monotonic() - due > REQUEST_TIMEOUT
            if not failed:
                payload = None if body is None else json.dumps(body).encode()
                try:
                    conn.request(method, path, payload, {**headers, **JSON})
                    answer = conn.getresponse()
                    answer.read()
                    failed = answer.status >= 300
                except (OSError, http.client.HTTPException):
                    conn.close()
                    failed = True
            with lock:
                latencies.append(time.monotonic() - due)
                errors[0] += failed
        conn.close()

    senders = [threading.Thread(target=send, daemon=True) for _ in range(CONNECTIONS)]
    for sender in senders:
        sender.start()
    start = time.monotonic() + 0.1
    for n in range(count):
        due = start + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        due_queue.put((n, due))
    for _ in senders:
        due_queue.put(None)
    for sender in senders:
        sender.join()
    return Load(latencies, errors[0], time.monotonic() - start)


def registration_api(
    db_url: str,
    *,
    rate: float = 200.0,
    seconds: float = 30.0,
    floor_seconds: float = 10.0,
    batch_requests: int = 3,
) -> tuple[list[Figure], str]:
    """Single registrations at `rate`/s against GET /healthz; batch endpoint throughput.

    Also returns a py-spy profile of the API process under the load.
    """
    # The memory run before this one rewrote 200,000 rows: measured right after it, the
    # API met autovacuum and the checkpoint catching up (p99 0.55-1 s, against 47-68 ms).
    settle_database(db_url)
    engine = make_engine(db_url)
    api_key = new_api_key(sessionmaker(bind=engine), f"load-{uuid.uuid4().hex[:8]}")
    engine.dispose()
    headers = {"Authorization": f"Bearer {api_key}"}
    run = uuid.uuid4().hex[:8]

    def health(_: int) -> tuple[str, str, Any]:
        return "GET", "/healthz", None

    def register(n: int) -> tuple[str, str, Any]:
        return "POST", "/v1/tasks", {"task_id": f"load-{run}-{n}", "callback_url": CALLBACK}

    def register_warm_up(n: int) -> tuple[str, str, Any]:
        return "POST", "/v1/tasks", {"task_id": f"warm-{run}-{n}", "callback_url": CALLBACK}

    logs = log_dir("api")
    log_path = str(logs / "api.log")
    with serving(db_url, log_path) as api_url:
        floor = open_loop(api_url, headers, health, rate=rate, seconds=floor_seconds)
        spy = Spy(pid_of("api", "--port", api_url.rsplit(":", 1)[1]), seconds, "tracker api")
        # Not measured: the first registrations of a process compile its statements.
        warm_up = open_loop(api_url, headers, register_warm_up, rate=rate, seconds=WARM_UP_SECONDS)
        load = open_loop(api_url, headers, register, rate=rate, seconds=seconds)
        profile = spy.text()
    batch = [
        {"task_id": f"batch-{run}-{n}", "callback_url": CALLBACK}
        for n in range(batch_requests * 1000)
    ]
    # A fresh process: an overloaded one may still be working off abandoned requests.
    with serving(db_url, str(logs / "api-batch.log")) as api_url, requests.Session() as http:
        http.headers.update(headers)
        batch_times = register_batches(http, api_url, batch)
    # The API logs the warm-up's requests first: they are not part of the measured run.
    server = server_side_times(log_path, "/v1/tasks")[len(warm_up.latencies) :]
    ms = 1000.0
    floor_p50, floor_p99 = (
        percentile(floor.latencies, 0.5) * ms,
        percentile(floor.latencies, 0.99) * ms,
    )
    p50, p99 = percentile(load.latencies, 0.5) * ms, percentile(load.latencies, 0.99) * ms
    label = f"register API {rate:g}/s for {seconds:g} s"
    floor_name = "GET /healthz at the same rate"
    figures = [
        Figure(f"{label}: p50", p50, "ms", "(informative)", None, floor_p50, "healthz p50"),
        Figure(
            f"{label}: p99",
            p99,
            "ms",
            f"< {TARGET_P99_MS:g}",
            p99 < TARGET_P99_MS,
            floor_p99,
            "healthz p99",
        ),
        Figure(
            f"{label}: achieved rate",
            load.rate,
            "req/s",
            f">= {0.95 * rate:g}",
            load.rate >= 0.95 * rate,
        ),
        Figure(f"{label}: errors", load.errors, "errors", "== 0", load.errors == 0),
        Figure(f"{label}: server-side p99", percentile(server, 0.99), "ms", "(informative)", None),
        Figure(f"floor: {floor_name} p50", floor_p50, "ms", "(baseline)", None),
        Figure(f"floor: {floor_name} p99", floor_p99, "ms", "(baseline)", None),
        Figure(
            "register API batch endpoint, 1000 a request",
            len(batch) / sum(batch_times),
            "tasks/s",
            "(informative)",
            None,
        ),
    ]
    return figures, profile


def main() -> None:
    """Run the benchmark alone: `python -m bench.scale`."""
    from bench.common import private_database, simulator_process

    started = time.perf_counter()
    with private_database() as db_url, simulator_process() as sim_url:
        figures = memory(db_url, sim_url)
        api_figures, profile = registration_api(db_url)
        for figure in figures + api_figures:
            print(figure.line(), flush=True)
        print(profile)
    print(f"scale: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
