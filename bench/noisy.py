"""Benchmark: noisy neighbours. Do a slow and a dead destination cost fast receivers anything?

Two fast receivers (each its own process, answering at once) get webhooks as tasks
complete: waves of deliveries written to the outbox, each wave's doorbell a `deliver`
job. Their completion-to-webhook latency (row written -> request read by the receiver,
both on the machine's monotonic clock) is measured twice in one run: alone, then with
1,000 deliveries queued to a slow destination (answers in 10 s) and 1,000 to a dead one
(accepts the connection and never answers) of another client, their doorbells rung
first. Then a burst of deliveries due at once to the fast receivers, alone and with the
noise still queued: their throughput.

The jobs run as a worker runs them: `attempt_deliveries` as the `deliver` job calls it
(pump, hand-off after `DELIVERY_HAND_OFF`, follow-ups rung as new jobs) from as many
threads as a worker has by default.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import timedelta

import psycopg
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bench.common import (
    EVENTS,
    TASK_COLUMNS,
    Figure,
    clear_tasks,
    plain_url,
    receiver_subprocess,
    seed_clients,
)
from bench.webhooks import DELIVERY_COLUMNS, _worker_attempt_log, payload
from tests.support.receiver import Receiver, Reply
from tracker.clock import utcnow
from tracker.config import Settings, load_settings
from tracker.db.engine import make_engine
from tracker.db.models import WebhookDelivery
from tracker.delivery.attempt import attempt_deliveries
from tracker.delivery.outbox import delivery_batches
from tracker.delivery.outcome import DeliveryOutcome
from tracker.tracking.schemas import destination_of
from tracker.worker.jobs import DELIVERY_HAND_OFF
from tracker.worker.roles import DEFAULT_CONCURRENCY

NOISE = 1000  # deliveries queued to each of the slow and the dead destination
SLOW_ANSWER = 10.0
WAVES = 50  # completions written in waves, as poll batches write them
WAVE_SIZE = 5  # per fast receiver and wave
WAVE_EVERY = 0.1  # seconds between waves: 100 webhooks/s, well within capacity
BURST = 2000  # per fast receiver, due at once: throughput alone and with the noise queued
WARM_UP_WAVES = 10  # not measured: the receivers' connections and the threads start
RECEIVED = "import json; print(json.dumps([(q.headers['webhook-id'], q.at) for q in r.requests]))"


class Worker:
    """A worker's `deliver` jobs on THREADS threads; follow-ups rung as new jobs."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        self.pool = ThreadPoolExecutor(DEFAULT_CONCURRENCY, thread_name_prefix="bench-deliver")
        self.jobs: list[Future[None]] = []
        self.lock = threading.Lock()
        self.closed = False

    def ring(self, delivery_ids: Sequence[str]) -> None:
        for batch in delivery_batches(delivery_ids):
            with self.lock:
                if self.closed:  # a slow answer's follow-up after the run: left to a sweep
                    return
                self.jobs.append(self.pool.submit(self.deliver, batch))

    def wait_idle(self, timeout: float) -> None:
        """Until every job rung so far has returned (its slow attempts handed off)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(job.done() for job in self.jobs):
                    return
            time.sleep(0.05)
        raise AssertionError(f"the worker's jobs did not return within {timeout} s")

    def deliver(self, delivery_ids: list[str]) -> None:
        outcomes = attempt_deliveries(
            self.sessions,
            delivery_ids,
            settings=self.settings,
            pump=True,
            hand_off_after=DELIVERY_HAND_OFF,
            on_outcomes=self.follow_up,
        )
        self.follow_up(outcomes)

    def follow_up(self, outcomes: Sequence[DeliveryOutcome]) -> None:
        self.ring([i for outcome in outcomes for i in outcome.follow_up_ids])

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.pool.shutdown(wait=True, cancel_futures=True)


class Outbox:
    """Writes deliveries as task completions do, one task each, and says when."""

    def __init__(self, db_url: str, sessions: sessionmaker[Session]) -> None:
        self.db_url = db_url
        self.written: dict[str, float] = {}  # delivery id -> time.monotonic() when committed
        self.count = 0
        fast, noisy = seed_clients(sessions, 2, "noisy")
        self.fast_client, self.noisy_client = fast, noisy

    def write(self, client_id: int, hooks: Sequence[str], per_hook: int) -> list[str]:
        """`per_hook` completed tasks to each hook, their deliveries due now; their ids."""
        now = utcnow()
        rows, ids = [], []
        with psycopg.connect(plain_url(self.db_url)) as conn:
            with conn.cursor() as cursor:
                for hook in hooks:
                    first = self.count + 1
                    self.count += per_hook
                    numbers = list(range(first, self.count + 1))
                    task_rows = cursor.execute(
                        f"INSERT INTO tasks ({TASK_COLUMNS}) "
                        "SELECT %(client)s, 'noisy-' || n, 'luma', 'completed', 'completed', "
                        "%(hook)s, '{}', %(events)s, 86400, %(now)s, %(now)s, %(now)s, "
                        "%(deadline)s, NULL, NULL, NULL FROM unnest(%(numbers)s::int[]) AS n "
                        "ORDER BY n RETURNING id",
                        {
                            "client": client_id,
                            "hook": hook,
                            "events": EVENTS,
                            "now": now,
                            "deadline": now + timedelta(days=1),
                            "numbers": numbers,
                        },
                    ).fetchall()
                    for n, (task_row_id,) in zip(numbers, task_rows, strict=True):
                        delivery_id = f"msg_noisy{n:023d}"
                        ids.append(delivery_id)
                        rows.append(
                            (
                                delivery_id,
                                client_id,
                                task_row_id,
                                "task.completed",
                                hook,
                                destination_of(hook),
                                payload(n),
                                "pending",
                                0,
                                now,
                                None,
                                now,
                                now,
                            )
                        )
                with cursor.copy(
                    f"COPY webhook_deliveries ({DELIVERY_COLUMNS}) FROM STDIN"
                ) as copy:
                    for row in rows:
                        copy.write_row(row)
            conn.commit()
        written = time.monotonic()
        self.written.update((delivery_id, written) for delivery_id in ids)
        return ids


def _waves(outbox: Outbox, worker: Worker, hooks: Sequence[str], waves: int) -> list[str]:
    """`waves` waves of completions to the fast hooks, WAVE_EVERY apart, each rung at once."""
    ids: list[str] = []
    started = time.monotonic()
    for wave in range(waves):
        time.sleep(max(0.0, started + wave * WAVE_EVERY - time.monotonic()))
        new = outbox.write(outbox.fast_client, hooks, WAVE_SIZE)
        worker.ring(new)
        ids += new
    return ids


def _burst(
    outbox: Outbox, worker: Worker, sessions: sessionmaker[Session], hooks: Sequence[str]
) -> float:
    """BURST deliveries to each fast hook, due at once: deliveries per second."""
    burst = outbox.write(outbox.fast_client, hooks, BURST)
    started = time.monotonic()
    worker.ring(burst)
    _wait_delivered(sessions, burst, 120)
    return len(burst) / (time.monotonic() - started)


def _wait_delivered(sessions: sessionmaker[Session], ids: Sequence[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions.begin() as session:
            done = session.scalar(
                select(func.count()).where(
                    WebhookDelivery.id.in_(ids), WebhookDelivery.status == "succeeded"
                )
            )
        if done == len(ids):
            return
        time.sleep(0.05)
    raise AssertionError(f"{len(ids) - (done or 0)} of {len(ids)} fast deliveries not delivered")


def _p99(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


@contextmanager
def _fast_receivers(count: int) -> Iterator[tuple[list[str], Callable[[], dict[str, float]]]]:
    """`count` fast receivers in their own processes; their hooks, and (once they are
    closed, on the way out) when each webhook id first arrived."""
    with ExitStack() as stack:
        outputs = []
        hooks = []
        for _ in range(count):
            hook, output = stack.enter_context(receiver_subprocess(RECEIVED))
            hooks.append(hook)
            outputs.append(output)
        arrived: dict[str, float] = {}

        def arrivals() -> dict[str, float]:
            return arrived

        yield hooks, arrivals
    for output in outputs:
        for delivery_id, at in json.loads(output[0].strip().splitlines()[-1]):
            arrived[delivery_id] = min(at, arrived.get(delivery_id, at))


def noisy_neighbours(db_url: str) -> list[Figure]:
    """Fast receivers' p99 completion-to-webhook latency with the noise vs without, and
    their throughput with it."""
    settings = load_settings(database_url=db_url, webhook_allow_private=True, _env_file=None)
    engine = make_engine(db_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    slow, dead = Receiver(), Receiver()
    slow.default_reply = Reply(delay=SLOW_ANSWER)
    dead.default_reply = Reply(delay=3600.0)  # accepts, reads, never answers
    clear_tasks(db_url)
    outbox = Outbox(db_url, sessions)
    worker = Worker(sessions, settings)
    try:
        with _worker_attempt_log(), _fast_receivers(2) as (hooks, arrivals):
            warm_up = _waves(outbox, worker, hooks, WARM_UP_WAVES)  # connections, threads
            _wait_delivered(sessions, warm_up, 60)
            quiet = _waves(outbox, worker, hooks, WAVES)
            _wait_delivered(sessions, quiet, 60)
            quiet_rate = _burst(outbox, worker, sessions, hooks)
            noise = outbox.write(outbox.noisy_client, [slow.url("/hook"), dead.url("/hook")], NOISE)
            worker.ring(noise)
            worker.wait_idle(30)  # the noise's jobs claimed what they may and handed off
            noisy = _waves(outbox, worker, hooks, WAVES)
            _wait_delivered(sessions, noisy, 60)
            rate = _burst(outbox, worker, sessions, hooks)
            with sessions.begin() as session:
                noise_in_flight = session.scalar(
                    select(func.count()).where(
                        WebhookDelivery.id.in_(noise), WebhookDelivery.status == "pending"
                    )
                )
        arrived = arrivals()
        latency = {
            name: [arrived[i] - outbox.written[i] for i in ids]
            for name, ids in (("quiet", quiet), ("noisy", noisy))
        }
    finally:
        slow.close()
        dead.close()
        worker.close()
        engine.dispose()
    quiet_p99, noisy_p99 = _p99(latency["quiet"]), _p99(latency["noisy"])
    ratio = noisy_p99 / quiet_p99
    fast = f"fast receivers, {2 * NOISE:,} queued to a slow and a dead"
    return [
        Figure(
            f"{fast}: p99 latency",
            noisy_p99 * 1000,
            "ms",
            "(vs alone)",
            None,
            quiet_p99 * 1000,
            "alone",
        ),
        Figure(f"{fast}: p99 ratio", ratio, "x", "<= 1.5", ratio <= 1.5),
        Figure(
            f"{fast}: throughput",
            rate,
            "deliv/s",
            ">= 500",
            rate >= 500,
            quiet_rate,
            "alone",
        ),
        Figure("noise still pending meanwhile", noise_in_flight or 0, "deliv", "(info)", None),
    ]
