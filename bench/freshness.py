"""Benchmark 4: freshness, from a task's completion in the simulator to its webhook's arrival.

10,000 tasks are registered through the API's batch endpoint (`tracker api`,
1000 a request), each with a callback to a loopback receiver. The simulator is
then seeded with the same ids, running, each set to settle at its own moment,
spread evenly (in random order) over a window that starts `lead` seconds later
(time for the roles to start and make a first poll cycle). Real `tracker
worker` and `tracker beat` processes, with the default settings (and any
stated overrides), poll and deliver. A task's latency is the first arrival of
its webhook minus the simulator's `settled_at`; it splits into the detection
lag (until the tracker recorded the terminal transition) and the delivery lag.

With the defaults (20 requests/s of 50 ids) the upstream budget polls 1,000 ids
a second, half of what 10,000 tasks polled every 5 s need: the first figure
prints that ratio. `upstream_rps=50` states a budget that covers the demand.
"""

from __future__ import annotations

import math
import random
import time
import uuid

import psycopg
import requests
from sqlalchemy.orm import sessionmaker

from bench.common import Figure, clear_tasks, plain_url, reset_simulator, settle_database
from bench.list_pages import serving
from bench.roles import (
    Spy,
    arrivals_receiver,
    log_dir,
    new_api_key,
    register_batches,
    tracker_env,
    wait_for,
    worker_and_beat,
)
from tracker.config import Settings
from tracker.db.engine import make_engine

DRAIN = 60.0  # seconds allowed after the last settle for the last webhooks
RUNNING_AGE = 10.0  # seeded tasks were created upstream this long ago: running already


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (inf when that rank is a missing value)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def delivered(db_url: str) -> int:
    with psycopg.connect(plain_url(db_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM webhook_deliveries WHERE status = 'succeeded'"
        ).fetchone()
    return int(row[0]) if row else 0


def observed_at(db_url: str) -> dict[str, float]:
    """When the tracker recorded each task's completion (Unix seconds), by upstream id."""
    with psycopg.connect(plain_url(db_url)) as conn:
        rows = conn.execute(
            "SELECT t.task_id, extract(epoch FROM tt.observed_at) FROM task_transitions tt "
            "JOIN tasks t ON t.id = tt.task_row_id WHERE tt.to_state = 'completed'"
        ).fetchall()
    return {task_id: float(at) for task_id, at in rows}


def seed_settling(sim_url: str, ids: list[str], *, lead: float, window: float) -> None:
    """The ids, running upstream, settling `lead` .. `lead + window` seconds from now."""
    offsets = [lead + window * n / len(ids) for n in range(len(ids))]
    random.Random(7).shuffle(offsets)
    seeds = [
        {"id": task_id, "outcome": "completed", "age": RUNNING_AGE, "duration": RUNNING_AGE + at}
        for task_id, at in zip(ids, offsets, strict=True)
    ]
    requests.post(f"{sim_url}/_sim/tasks", json={"tasks": seeds}, timeout=120).raise_for_status()


def settled_at(sim_url: str) -> dict[str, float]:
    items = requests.get(f"{sim_url}/_sim/tasks", timeout=60).json()["items"]
    return {item["id"]: item["settled_at"] for item in items if item["settled_at"] is not None}


def freshness(
    db_url: str,
    sim_url: str,
    *,
    tasks: int = 10_000,
    window: float = 40.0,
    lead: float = 20.0,
    **settings: object,
) -> tuple[list[Figure], str]:
    """One run: p50 / p99 completion-to-webhook latency against poll interval + 1 s.

    Also returns a py-spy profile of the worker while the tasks settle.
    `settings` (e.g. batch_size=100) override the defaults, and are named in the figures.
    """
    default_interval = Settings.model_fields["poll_interval"].default
    interval = float(str(settings.get("poll_interval", default_interval)))
    clear_tasks(db_url)
    reset_simulator(sim_url)
    engine = make_engine(db_url)
    api_key = new_api_key(sessionmaker(bind=engine), f"freshness-{uuid.uuid4().hex[:8]}")
    engine.dispose()
    ids = [str(uuid.uuid4()) for _ in range(tasks)]
    logs = log_dir("freshness")
    with arrivals_receiver() as (hook, arrivals):
        registrations: list[dict[str, object]] = [
            {"task_id": task_id, "callback_url": hook, "metadata": {"order": n}}
            for n, task_id in enumerate(ids)
        ]
        with serving(db_url, str(logs / "api.log")) as api_url, requests.Session() as http:
            http.headers["Authorization"] = f"Bearer {api_key}"
            register_batches(http, api_url, registrations)
        # Statistics for the 10,000 new rows, as autovacuum would gather after so many
        # inserts (the tests' server runs without it), and no checkpoint due mid-run.
        settle_database(db_url)
        # Seeded after registering: no task settles before the tracker knows it.
        seed_settling(sim_url, ids, lead=lead, window=window)
        env = tracker_env(db_url, sim_url, **settings)
        with worker_and_beat(env, logs) as roles:
            spy = Spy(roles.children["worker"].pid, lead + window, "tracker worker (freshness)")
            wait_for(lambda: delivered(db_url) >= tasks, timeout=lead + window + DRAIN, interval=1)
            profile = spy.text()
    settled = settled_at(sim_url)
    observed = observed_at(db_url)
    first: dict[str, float] = {}
    for task_id, at in arrivals:
        first[task_id] = min(at, first.get(task_id, at))
    latency = [first.get(t, math.inf) - settled.get(t, math.inf) for t in ids]
    detection = [observed.get(t, math.inf) - settled.get(t, math.inf) for t in ids]
    delivery = [first.get(t, math.inf) - observed.get(t, math.inf) for t in ids]
    target = interval + 1.0
    p99 = percentile(latency, 0.99)
    name = f"freshness {tasks:,} tasks settling over {window:.0f} s"
    name += "".join(f", {key} {value}" for key, value in settings.items())
    base = {"baseline": interval, "baseline_name": "poll interval"}
    # The upstream budget caps how many ids a second can be polled, whatever the worker does.
    rps = float(str(settings.get("upstream_rps", Settings.model_fields["upstream_rps"].default)))
    batch = int(str(settings.get("batch_size", Settings.model_fields["batch_size"].default)))
    demand = tasks / interval
    figures = [
        Figure(f"{name}: poll demand / budget", demand / (rps * batch), "x", "(informative)", None),
        Figure(
            f"{name}: webhooks received", len(first), "hooks", f"== {tasks}", len(first) == tasks
        ),
        Figure(f"{name}: p50", percentile(latency, 0.5), "s", "(informative)", None, **base),
        Figure(f"{name}: p99", p99, "s", f"<= {target:g} (interval+1)", p99 <= target, **base),
        Figure(f"{name}: detection p99", percentile(detection, 0.99), "s", "(informative)", None),
        Figure(f"{name}: delivery p99", percentile(delivery, 0.99), "s", "(informative)", None),
    ]
    return figures, profile


def main() -> None:
    """Run the benchmark alone: `python -m bench.freshness [SETTING=VALUE ...]`."""
    import sys

    from bench.common import private_database, simulator_process

    settings = dict(arg.split("=", 1) for arg in sys.argv[1:])
    started = time.perf_counter()
    with private_database() as db_url, simulator_process() as sim_url:
        figures, profile = freshness(db_url, sim_url, **settings)
        for figure in figures:
            print(figure.line(), flush=True)
        print(profile)
    print(f"freshness: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
