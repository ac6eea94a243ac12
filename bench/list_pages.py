"""Benchmark: page through 1,000,000 tasks of one client, newest first, on PostgreSQL.

Seeds a private database (created here, migrated, filled with COPY), then walks
every page of `GET /v1/tasks` through the query function the API uses (one
transaction per page, rows serialised to resources, as a request does), walks
each filter for a stretch, and pages through the HTTP API served by `tracker api`
in its own process (timed at the client, and by the API's own log line).
Prints per-page latency p50 / p99 / max and the pages of 20 ms or more; PASS
when there are none (the first, cold page of each walk is shown apart).

    .venv/bin/python bench/list_pages.py [--tasks 1000000] [--keep]

PostgreSQL admin URL: TRACKER_BENCH_POSTGRES_URL (default: the tests' server).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import requests
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from tracker.db import migrate
from tracker.db.engine import make_engine
from tracker.db.queries import list_tasks, task_resource
from tracker.tracking.clients import NewClient, create_client

ADMIN_URL = os.environ.get(
    "TRACKER_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TARGET_MS = 20.0
PAGE_SIZE = 50
COLUMNS = (
    "client_id, task_id, service, state, upstream_state, callback_url, metadata, events, "
    "timeout_seconds, created_at, updated_at, finished_at, deadline_at, "
    "failure_code, failure_message, record"
)
# A registration's `task_schedule` row, for those COPY has just written: an active one is
# due at %(due_at)s (its creation time if null), a terminal one never.
SCHEDULE_NEW_TASKS = """
    INSERT INTO task_schedule (task_row_id, next_poll_at, claimed_until, polls, misses)
    SELECT id, CASE WHEN state IN ('pending', 'running')
                    THEN COALESCE(%(due_at)s, created_at) END, NULL, %(polls)s, 0
    FROM tasks
    WHERE NOT EXISTS (SELECT FROM task_schedule WHERE task_row_id = tasks.id)
"""
EVENTS = json.dumps(["task.completed", "task.failed", "task.timed_out"])
RECORD = json.dumps(
    {"id": "x", "response": {"success": True, "state": "completed", "video_url": "https://v/x"}}
)


@contextmanager
def private_database() -> Iterator[str]:
    """A fresh, migrated database, dropped afterwards."""
    admin = make_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"tracker_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        if "--keep" not in sys.argv:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def seed(url: str, sessions: sessionmaker[Session], count: int) -> NewClient:
    """`count` tasks of one client a second apart (plus another client's), with COPY."""
    with sessions() as session, session.begin():
        bench = create_client(session, "bench")
        client_id = bench.client.id
        other_id = create_client(session, "noise").client.id
    start = datetime(2025, 1, 1, tzinfo=UTC)
    plain = sa.engine.make_url(url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(plain) as conn, conn.cursor() as cursor:
        with cursor.copy(f"COPY tasks ({COLUMNS}) FROM STDIN") as copy:
            for n in range(count + count // 10):
                owner = client_id if n < count else other_id
                created = start + timedelta(seconds=n % count, microseconds=n // count)
                state = ("completed", "completed", "completed", "failed", "running", "pending")[
                    n % 6
                ]
                terminal = state in ("completed", "failed")
                copy.write_row(
                    (
                        owner,
                        f"task-{n:08d}",
                        "kling" if n % 5 == 0 else "luma",
                        state,
                        state if state != "pending" else None,
                        "https://hooks.example.com/tracker",
                        f'{{"order": {n}}}',
                        EVENTS,
                        3600,
                        created,
                        created,
                        created + timedelta(minutes=2) if terminal else None,
                        created + timedelta(hours=1),
                        "content_policy" if state == "failed" else None,
                        "prompt refused" if state == "failed" else None,
                        RECORD if terminal else None,
                    )
                )
        conn.execute(SCHEDULE_NEW_TASKS, {"due_at": None, "polls": 7})
        conn.execute("ANALYZE tasks")
        conn.execute("ANALYZE task_schedule")
        conn.commit()
    return bench


def timed_pages(
    fetch: Callable[[str | None], str | None], *, max_pages: int | None = None
) -> list[float]:
    """Milliseconds per page, following `next_cursor` until the end or `max_pages`."""
    times: list[float] = []
    cursor: str | None = None
    while True:
        started = time.perf_counter()
        cursor = fetch(cursor)
        times.append((time.perf_counter() - started) * 1000)
        if cursor is None or (max_pages is not None and len(times) >= max_pages):
            return times


def report(label: str, times: list[float]) -> bool:
    """One line: p50, p99, the slowest page and how many took 20 ms or more.

    The first page of a walk is left out of the verdict (shown as `first`): it
    pays for the connection and the statement's first compilation, once per process.
    """
    first, rest = times[0], sorted(times[1:])
    p50 = statistics.median(rest)
    p99 = rest[min(len(rest) - 1, int(len(rest) * 0.99))]
    over = sum(1 for t in rest if t >= TARGET_MS)
    passed = over == 0
    print(
        f"{label:<44} pages {len(times):>6}   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   "
        f"max {rest[-1]:7.2f} ms   >= {TARGET_MS:.0f} ms: {over:>3}   first {first:6.2f} ms   "
        f"{'PASS' if passed else 'FAIL'}"
    )
    return passed


def query_pager(
    sessions: sessionmaker[Session], client_id: int, **filters: Any
) -> Callable[[str | None], str | None]:
    """One page as the API computes it: a transaction, the keyset query, the resources."""

    def fetch(cursor: str | None) -> str | None:
        with sessions() as session, session.begin():
            page = list_tasks(
                session, client_id=client_id, limit=PAGE_SIZE, cursor=cursor, **filters
            )
            [task_resource(task) for task in page.items]
        return page.next_cursor

    return fetch


@contextmanager
def serving(url: str, log_path: str) -> Iterator[str]:
    """`tracker api` in its own process on a free loopback port, logging JSON; its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "TRACKER_DATABASE_URL": url, "TRACKER_LOG_FORMAT": "json"}
    from bench.common import api_process  # bench.common imports this module

    with api_process(env, port, log_path) as base_url:
        yield base_url


def server_side_times(log_path: str, path: str) -> list[float]:
    """The durations the API logged for requests of `path` (its own time, no client)."""
    times = []
    with open(log_path) as log:
        for line in log:
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("path") == path and "duration_ms" in entry:
                    times.append(float(entry["duration_ms"]))
    return times


def http_pager(base_url: str, api_key: str) -> Callable[[str | None], str | None]:
    """One page through real HTTP (uvicorn, auth, validation, JSON), over keep-alive."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {api_key}"

    def fetch(cursor: str | None) -> str | None:
        params: dict[str, Any] = {"limit": PAGE_SIZE, **({"cursor": cursor} if cursor else {})}
        answer = http.get(f"{base_url}/v1/tasks", params=params, timeout=10)
        answer.raise_for_status()
        next_cursor: str | None = answer.json()["next_cursor"]
        return next_cursor

    return fetch


def deep_page_plan(sessions: sessionmaker[Session], client_id: int, middle: datetime) -> str:
    """EXPLAIN of a page in the middle of the listing: it must be one index range scan."""
    with sessions() as session, session.begin():
        plan = session.execute(
            sa.text(
                "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM tasks WHERE client_id = :c "
                "AND (created_at, id) < (:t, 9223372036854775807) "
                "ORDER BY created_at DESC, id DESC LIMIT 51"
            ),
            {"c": client_id, "t": middle},
        ).scalars()
        return "\n".join(f"    {line}" for line in plan)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    parser.add_argument("--http-pages", type=int, default=1000)
    args = parser.parse_args()

    with private_database() as url:
        engine = make_engine(url)
        sessions = sessionmaker(bind=engine, expire_on_commit=False)
        started = time.perf_counter()
        bench = seed(url, sessions, args.tasks)
        client_id = bench.client.id
        print(
            f"seeded {args.tasks:,} tasks (+{args.tasks // 10:,} of another client) "
            f"in {time.perf_counter() - started:.0f} s"
        )
        mid = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=args.tasks // 2)
        print(deep_page_plan(sessions, client_id, mid))
        # As the API process does at start-up (tracker/api/app.py): keep the long-lived
        # objects out of full collections, which would otherwise stall a page now and then.
        gc.collect()
        gc.freeze()
        runs: list[tuple[str, dict[str, Any], int | None]] = [
            ("every page, no filter (query function)", {}, None),
            ("state=failed, first 2000 pages", {"state": "failed"}, 2000),
            ("service=kling, first 2000 pages", {"service": "kling"}, 2000),
            ("created_before=middle, first 2000 pages", {"created_before": mid}, 2000),
        ]
        results = [
            report(label, timed_pages(query_pager(sessions, client_id, **filters), max_pages=cap))
            for label, filters, cap in runs
        ]
        log_path = os.path.join(tempfile.gettempdir(), f"tracker-bench-api-{os.getpid()}.log")
        with serving(url, log_path) as base_url:
            http = http_pager(base_url, bench.api_key)
            http_times = timed_pages(http, max_pages=args.http_pages)
        server_times = server_side_times(log_path, "/v1/tasks")
        label = f"first {args.http_pages} pages"
        results.append(report(f"HTTP GET /v1/tasks, {label}, at the client", http_times))
        results.append(report(f"HTTP GET /v1/tasks, {label}, in the API", server_times))
        engine.dispose()
    verdict = all(results)
    print(f"target: every page < {TARGET_MS:.0f} ms -> {'PASS' if verdict else 'FAIL'}")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
