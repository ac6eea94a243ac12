"""Benchmark 3: webhook deliveries per second to a loopback receiver, vs a bare requests loop.

Due outbox rows are seeded with COPY (one completed task each, a realistic
payload). The measured path is the worker's: the due ids are cut into the
batches the doorbells carry (`delivery_batches`), and `attempt_deliveries`,
what the `deliver` job calls, runs on them from as many threads as a worker
has by default (`tracker.worker.roles.DEFAULT_CONCURRENCY`), on an engine with the
worker's pool settings, sending from the process's sending threads and pooled
HTTP session, logging each attempt as a worker does (to /dev/null). The floor
posts the same signed payloads from one plain `requests.Session`, one after
another.
"""

from __future__ import annotations

import cProfile
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta

import psycopg
import requests
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from bench.common import (
    Figure,
    clear_tasks,
    median,
    plain_url,
    profile_text,
    seed_clients,
    seed_tasks,
)
from tracker.clock import utcnow
from tracker.config import Settings, load_settings
from tracker.db.engine import make_engine
from tracker.db.models import WebhookDelivery, WebhookSecret
from tracker.delivery.attempt import attempt_deliveries
from tracker.delivery.outbox import delivery_batches, due_delivery_ids
from tracker.delivery.outcome import DeliveryOutcome
from tracker.delivery.signing import webhook_headers
from tracker.observability.logs import JsonFormatter, SecretMask
from tracker.tracking.schemas import destination_of
from tracker.worker.roles import DEFAULT_CONCURRENCY

THREADS = DEFAULT_CONCURRENCY  # a worker's threads, each running `deliver` jobs
PROFILED = 2000  # deliveries attempted batch after batch under cProfile
DELIVERY_COLUMNS = (
    "id, client_id, task_row_id, event, callback_url, destination, payload, status, attempts, "
    "next_attempt_at, claimed_until, created_at, updated_at"
)


def payload(n: int) -> str:
    """A `task.completed` body of the size polling writes (about 600 bytes)."""
    return json.dumps(
        {
            "type": "task.completed",
            "timestamp": "2026-11-29T06:00:00Z",
            "data": {
                "task_id": f"task-{n:08d}",
                "service": "luma",
                "state": "completed",
                "previous_state": "running",
                "upstream_state": "completed",
                "metadata": {"order": n},
                "failure": None,
                "created_at": "2026-11-29T05:59:00Z",
                "finished_at": "2026-11-29T06:00:00Z",
                "record": {
                    "id": f"task-{n:08d}",
                    "response": {
                        "success": True,
                        "state": "completed",
                        "video_url": f"https://cdn.example.com/videos/{n:08d}.mp4",
                        "thumbnail_url": f"https://cdn.example.com/thumbs/{n:08d}.jpg",
                    },
                },
            },
        },
        separators=(",", ":"),
    )


def seed_deliveries(db_url: str, sessions: sessionmaker[Session], hook: str, count: int) -> None:
    """`count` completed tasks of one client, each with one due delivery to `hook`."""
    clear_tasks(db_url)
    (client_id,) = seed_clients(sessions, 1, f"webhooks-{count}")
    seed_tasks(
        db_url,
        [(client_id, f"task-{n:08d}") for n in range(count)],
        state="completed",
        upstream_state="completed",
        callback_url=hook,
    )
    now = utcnow() - timedelta(seconds=1)
    with psycopg.connect(plain_url(db_url)) as conn, conn.cursor() as cursor:
        rows = conn.execute("SELECT id FROM tasks ORDER BY id").fetchall()
        with cursor.copy(f"COPY webhook_deliveries ({DELIVERY_COLUMNS}) FROM STDIN") as copy:
            for n, (task_row_id,) in enumerate(rows):
                copy.write_row(
                    (
                        f"msg_bench{n:023d}",
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
        conn.execute("ANALYZE webhook_deliveries")
        conn.commit()


def make_pending_again(db_url: str) -> None:
    """Every delivery pending and due again, its attempt log emptied: the next run starts equal."""
    with psycopg.connect(plain_url(db_url), autocommit=True) as conn:
        conn.execute("TRUNCATE webhook_attempts")
        conn.execute(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, claimed_until = NULL, "
            "next_attempt_at = now() - interval '1 second', delivered_at = NULL, "
            "last_status_code = NULL"
        )
        conn.execute("VACUUM ANALYZE webhook_deliveries")


def _due_ids(sessions: sessionmaker[Session], count: int) -> list[str]:
    with sessions.begin() as session:
        return due_delivery_ids(session, now=utcnow(), limit=count, per_destination=count)


@contextmanager
def _worker_attempt_log() -> Iterator[None]:
    """The line a worker logs per attempt (INFO, JSON, secrets masked), written to /dev/null."""
    logger = logging.getLogger("tracker.delivery")
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(SecretMask())
        level, propagate = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def _deliver_pooled(sessions: sessionmaker[Session], ids: list[str], settings: Settings) -> float:
    """Deliveries per second of `deliver` jobs' `attempt_deliveries` from THREADS threads."""

    def job(batch: list[str]) -> list[DeliveryOutcome]:
        # As the `deliver` job: a destination's backlog is pumped by the jobs that hold
        # its slots (TRACKER_DESTINATION_CONCURRENCY), the others' ids wait for them.
        return attempt_deliveries(sessions, batch, settings=settings, pump=True)

    with _worker_attempt_log():
        started = time.perf_counter()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(job, delivery_batches(ids)))
            while rest := _due_ids(sessions, len(ids)):  # what the jobs' pumps left
                list(pool.map(job, delivery_batches(rest)))
        elapsed = time.perf_counter() - started
    with sessions.begin() as session:
        succeeded = session.scalar(
            select(func.count()).where(
                WebhookDelivery.id.in_(ids), WebhookDelivery.status == "succeeded"
            )
        )
    assert succeeded == len(ids), f"{len(ids) - (succeeded or 0)} deliveries did not succeed"
    return len(ids) / elapsed


def _bare_floor(sessions: sessionmaker[Session], ids: list[str], hook: str) -> float:
    """Posts per second of the same signed payloads from one plain requests.Session."""
    with sessions.begin() as session:
        secret = session.scalars(select(WebhookSecret.secret)).first()
        assert secret is not None
        bodies = [
            (row.id, row.payload.encode())
            for row in session.execute(
                select(WebhookDelivery.id, WebhookDelivery.payload).where(
                    WebhookDelivery.id.in_(ids)
                )
            )
        ]
    http = requests.Session()
    started = time.perf_counter()
    for msg_id, body in bodies:
        headers = webhook_headers([secret], msg_id, int(time.time()), body)
        answer = http.post(hook, data=body, headers=headers, timeout=15)
        assert answer.status_code == 200
    elapsed = time.perf_counter() - started
    http.close()
    return len(bodies) / elapsed


def _profile(sessions: sessionmaker[Session], ids: list[str], settings: Settings) -> str:
    """cProfile of `deliver` jobs one after another (the job's thread: claim, wait, record;
    the requests themselves run in the sending threads, which cProfile does not see)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for batch in delivery_batches(ids):
        attempt_deliveries(sessions, batch, settings=settings)
    profiler.disable()
    return profile_text(profiler, r"tracker/|sqlalchemy/orm/session|requests/sessions")


def webhook_throughput(
    db_url: str, hook: str, count: int, *, runs: int
) -> tuple[list[Figure], str]:
    """Benchmark 3: figures, and the profile text of the attempts."""
    settings = load_settings(database_url=db_url, webhook_allow_private=True, _env_file=None)
    engine = make_engine(db_url)  # the worker's pool settings (`tracker.db.engine.get_engine`)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    try:
        seed_deliveries(db_url, sessions, hook, count)
        rates = []
        for run in range(runs):
            if run:
                make_pending_again(db_url)
            ids = _due_ids(sessions, count)
            assert len(ids) == count, (len(ids), count)
            rates.append(_deliver_pooled(sessions, ids, settings))
        # The floor is cheap: always the median of three.
        floors = [_bare_floor(sessions, ids, hook) for _ in range(3)]
        make_pending_again(db_url)
        profile = _profile(sessions, _due_ids(sessions, PROFILED), settings)
    finally:
        engine.dispose()
    rate, floor = median(rates), median(floors)
    name = f"webhooks {count:,} due, {THREADS} deliver threads"
    figures = [
        Figure(name, rate, "deliv/s", ">= 500", rate >= 500, floor, "floor"),
        Figure(f"{name} vs floor", rate / floor, "x", ">= 0.5", rate / floor >= 0.5),
        Figure("floor: bare requests.Session loop", floor, "posts/s", "(baseline)", None),
    ]
    return figures, profile
