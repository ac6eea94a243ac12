"""Benchmark 6: completion-to-webhook latency with the doorbell against polling alone, in
one run.

`tasks` registrations have a doorbell (as `POST /v1/{service}/submit` gives them: a
token per registration, its hash stored) and `polled` have none; all are registered
through the API's batch endpoint with a callback to a loopback receiver. The
simulator is seeded with the same ids, running, settling at their own moments
spread evenly (in random order) over a window; the doorbell tasks carry their
doorbell URL as `callback_url`, so the simulator POSTs it when they settle, as
AceData does. A real `tracker api` (with TRACKER_PUBLIC_URL), `tracker worker` and
`tracker beat` poll, ring and deliver (`workers=2` adds a worker process: at this
size one worker is near its CPU limit, with or without the doorbell). A task's
latency is the first arrival of its webhook minus the simulator's `settled_at`; the
polling-alone tasks are the baseline, measured in the same run on the same processes.

Submitting 10,000 tasks one by one would only add minutes before the measurement:
the bench registers in batches and writes the doorbell hashes itself, which is what
a submission stores.
"""

from __future__ import annotations

import math
import random
import sys
import time
import uuid
from collections.abc import Mapping

import psycopg
import requests
from sqlalchemy.orm import sessionmaker

from bench.common import (
    Figure,
    api_process,
    clear_tasks,
    free_port,
    plain_url,
    reset_simulator,
)
from bench.common import settle_database as vacuum_and_checkpoint
from bench.freshness import delivered, percentile, settled_at
from bench.roles import (
    arrivals_receiver,
    log_dir,
    new_api_key,
    register_batches,
    tracker_env,
    wait_for,
    worker_and_beat,
)
from tracker.db.engine import make_engine
from tracker.polling.doorbell import doorbell_hash, doorbell_url, new_doorbell_token

DRAIN = 60.0
RUNNING_AGE = 10.0
# AceData's own cap: the budget covers the two arms' polling (12,000 tasks every 5 s).
DOORBELL_RPS = 60


def store_doorbells(db_url: str, tokens: Mapping[str, str]) -> None:
    """What a submission stores of each doorbell token: its hash, on the registration."""
    with psycopg.connect(plain_url(db_url), autocommit=True) as conn:
        conn.execute(
            "UPDATE tasks SET doorbell_hash = v.hash FROM unnest(%s::text[], %s::text[]) "
            "AS v(task_id, hash) WHERE tasks.task_id = v.task_id",
            (list(tokens), [doorbell_hash(token) for token in tokens.values()]),
        )


def seed(
    sim_url: str, ids: list[str], callbacks: Mapping[str, str], *, lead: float, window: float
) -> None:
    offsets = [lead + window * n / len(ids) for n in range(len(ids))]
    random.Random(11).shuffle(offsets)
    seeds = [
        {
            "id": task_id,
            "outcome": "completed",
            "age": RUNNING_AGE,
            "duration": RUNNING_AGE + at,
            "callback_url": callbacks.get(task_id),
        }
        for task_id, at in zip(ids, offsets, strict=True)
    ]
    requests.post(f"{sim_url}/_sim/tasks", json={"tasks": seeds}, timeout=300).raise_for_status()


def doorbell(
    db_url: str,
    sim_url: str,
    *,
    tasks: int = 10_000,
    polled: int = 1_000,
    window: float = 40.0,
    lead: float = 20.0,
    workers: int = 1,
    **settings: object,
) -> list[Figure]:
    """One run: p50 / p99 completion-to-webhook latency, doorbell against polling alone."""
    settings.setdefault("upstream_rps", DOORBELL_RPS)
    clear_tasks(db_url)
    reset_simulator(sim_url)
    engine = make_engine(db_url)
    api_key = new_api_key(sessionmaker(bind=engine), f"doorbell-{uuid.uuid4().hex[:8]}")
    engine.dispose()
    rung = [str(uuid.uuid4()) for _ in range(tasks)]
    alone = [str(uuid.uuid4()) for _ in range(polled)]
    ids = rung + alone
    random.Random(5).shuffle(ids)
    logs = log_dir("doorbell")
    env = tracker_env(db_url, sim_url, **settings)
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    with arrivals_receiver() as (hook, arrivals):
        with api_process(
            {**env, "TRACKER_PUBLIC_URL": public_url}, port, logs / "api.log"
        ) as api_url:
            with requests.Session() as http:
                http.headers["Authorization"] = f"Bearer {api_key}"
                register_batches(http, api_url, [{"task_id": i, "callback_url": hook} for i in ids])
            tokens = {task_id: new_doorbell_token() for task_id in rung}
            store_doorbells(db_url, tokens)
            vacuum_and_checkpoint(db_url)
            callbacks = {i: doorbell_url(public_url, token) for i, token in tokens.items()}
            seed(sim_url, ids, callbacks, lead=lead, window=window)
            with worker_and_beat(env, logs) as roles:
                for n in range(2, workers + 1):  # one worker process per core
                    roles.start(f"worker-{n}", ["worker"])
                done = len(ids)
                wait_for(lambda: delivered(db_url) >= done, timeout=lead + window + DRAIN)
        stats = requests.get(f"{sim_url}/_sim/stats", timeout=30).json()
    settled = settled_at(sim_url)
    first: dict[str, float] = {}
    for task_id, at in arrivals:
        first[task_id] = min(at, first.get(task_id, at))

    def latency(arm: list[str]) -> list[float]:
        return [first.get(t, math.inf) - settled.get(t, math.inf) for t in arm]

    with_bell, without = latency(rung), latency(alone)
    bell_p99, poll_p99 = percentile(with_bell, 0.99), percentile(without, 0.99)
    name = f"doorbell {tasks:,} + {polled:,} polled-only tasks settling over {window:.0f} s"
    name += f", {workers} workers"
    name += "".join(f", {key} {value}" for key, value in settings.items())
    base = {"baseline": poll_p99, "baseline_name": "polling alone p99"}
    return [
        Figure(
            f"{name}: webhooks received",
            len(first),
            "hooks",
            f"== {len(ids)}",
            len(first) == len(ids),
        ),
        Figure(
            f"{name}: callbacks sent by the simulator",
            stats["callbacks_sent"],
            "posts",
            f"== {tasks}",
            stats["callbacks_sent"] == tasks,
        ),
        Figure(f"{name}: polling alone p50", percentile(without, 0.5), "s", "(informative)", None),
        Figure(f"{name}: polling alone p99", poll_p99, "s", "(informative)", None),
        Figure(
            f"{name}: with the doorbell p50",
            percentile(with_bell, 0.5),
            "s",
            "(informative)",
            None,
            **base,
        ),
        Figure(f"{name}: with the doorbell p99", bell_p99, "s", "<= 1", bell_p99 <= 1.0, **base),
    ]


def main() -> None:
    """Run the benchmark alone: `python -m bench.doorbell [SETTING=VALUE ...]`; `tasks=N`,
    `polled=N`, `window=S` size the run."""
    from bench.common import private_database, simulator_process

    args = dict(arg.split("=", 1) for arg in sys.argv[1:])
    shape = {k: float(args.pop(k)) for k in ("window", "lead") if k in args}
    counts = {k: int(args.pop(k)) for k in ("tasks", "polled", "workers") if k in args}
    started = time.perf_counter()
    with private_database() as db_url, simulator_process() as sim_url:
        for figure in doorbell(db_url, sim_url, **counts, **shape, **args):  # type: ignore[arg-type]
            print(figure.line(), flush=True)
    print(f"doorbell: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
