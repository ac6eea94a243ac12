"""Retention on PostgreSQL at size: pruning 100,000 old tasks with their history in bounded
batches while registrations and polls go on, which keep their latency."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from tracker.clock import utcnow
from tracker.config import load_settings
from tracker.db.engine import make_engine, transaction
from tracker.db.models import Task, WebhookAttempt, WebhookDelivery
from tracker.polling.claim import claim_due_tasks
from tracker.tracking.clients import create_client
from tracker.tracking.registration import register_task
from tracker.tracking.retention import prune_history
from tracker.tracking.schemas import TaskRegistration

OLD_TASKS = 100_000
ACTIVE_TASKS = 500

# Set-based, so that building the history takes seconds: each old task completed 60 days
# ago, with its two transitions, one succeeded delivery and its attempt.
_OLD_HISTORY = [
    """
    INSERT INTO tasks (client_id, task_id, service, state, upstream_state, callback_url,
        metadata, events, timeout_seconds, created_at, updated_at, finished_at, deadline_at)
    SELECT :client, 'old-' || n, 'luma', 'completed', 'completed',
        'https://hooks.example.com/t', '{}', '["task.completed"]', 86400,
        :then, :then, :then, :then + interval '1 day'
    FROM generate_series(1, :count) AS n
    """,
    """
    INSERT INTO task_schedule (task_row_id, next_poll_at, claimed_until, polls, misses)
    SELECT id, NULL, NULL, 3, 0 FROM tasks WHERE task_id LIKE 'old-%'
    """,
    """
    INSERT INTO task_transitions (task_row_id, from_state, to_state, upstream_state, observed_at)
    SELECT id, s.from_state, s.to_state, s.to_state, :then
    FROM tasks CROSS JOIN (VALUES (NULL, 'pending'), ('pending', 'completed'))
        AS s(from_state, to_state)
    WHERE task_id LIKE 'old-%'
    """,
    """
    INSERT INTO webhook_deliveries (id, client_id, task_row_id, event, callback_url,
        destination, payload, status, attempts, created_at, updated_at, delivered_at)
    SELECT 'msg_old' || id, client_id, id, 'task.completed', callback_url,
        'https://hooks.example.com:443', '{}', 'succeeded', 1, :then, :then, :then
    FROM tasks WHERE task_id LIKE 'old-%'
    """,
    """
    INSERT INTO webhook_attempts (delivery_id, attempt, started_at, duration_ms, status_code)
    SELECT id, 1, :then, 12, 200 FROM webhook_deliveries WHERE id LIKE 'msg_old%'
    """,
    "ANALYZE",
]


def _p99(seconds: list[float]) -> float:
    return statistics.quantiles(seconds, n=100, method="inclusive")[98]


def test_registrations_and_polls_keep_their_latency_while_100k_old_tasks_are_pruned(
    pg_url: str,
) -> None:
    settings = load_settings(database_url=pg_url, _env_file=None)
    engine: Engine = make_engine(pg_url)
    try:
        now = utcnow()
        with Session(engine, expire_on_commit=False) as session, session.begin():
            client = create_client(session, "retention").client
            for n in range(ACTIVE_TASKS):  # active tasks the polls lease
                register_task(
                    session,
                    client,
                    TaskRegistration(task_id=f"active-{n}"),
                    now=now - timedelta(minutes=5),
                    settings=settings,
                )
            for statement in _OLD_HISTORY:
                session.execute(
                    text(statement),
                    {"client": client.id, "then": now - timedelta(days=60), "count": OLD_TASKS},
                )
        registered = [0]

        def register() -> None:
            with transaction(engine) as session:
                registered[0] += 1
                register_task(
                    session,
                    client,
                    TaskRegistration(task_id=f"new-{registered[0]}"),
                    now=utcnow(),
                    settings=settings,
                )

        def poll() -> None:
            with transaction(engine) as session:
                claim_due_tasks(
                    session, now=utcnow() + timedelta(days=1), limit=50, settings=settings
                )

        def work(until: Callable[[], bool]) -> dict[str, list[float]]:
            """Registrations and polls, one after the other, until `until()`: durations."""
            durations: dict[str, list[float]] = {"registration": [], "poll": []}
            while not until():
                for name, operation in (("registration", register), ("poll", poll)):
                    started = time.perf_counter()
                    operation()
                    durations[name].append(time.perf_counter() - started)
            return durations

        calm_until = time.monotonic() + 2.0
        before = work(lambda: time.monotonic() > calm_until)

        pruning = threading.Thread(
            target=prune_history,
            args=(engine,),
            kwargs={"older_than": timedelta(days=30), "now": utcnow()},
        )
        pruning.start()
        during = work(lambda: not pruning.is_alive())
        pruning.join()

        with Session(engine) as session:
            old_left = session.scalar(
                select(func.count()).select_from(Task).where(Task.task_id.like("old-%"))
            )
            deliveries_left = session.scalar(
                select(func.count()).where(WebhookDelivery.id.like("msg_old%"))
            )
            attempts_left = session.scalar(select(func.count()).select_from(WebhookAttempt))
        assert (old_left, deliveries_left, attempts_left) == (0, 0, 0)
        for name in ("registration", "poll"):
            assert len(during[name]) >= 20, f"only {len(during[name])} {name}s during the prune"
            p99_before, p99_during = _p99(before[name]), _p99(during[name])
            # Generous on a shared machine: three times the calm p99, or a quarter second.
            assert p99_during <= max(3 * p99_before, 0.25), (
                f"{name} p99 {p99_during * 1000:.1f} ms while pruning vs "
                f"{p99_before * 1000:.1f} ms before ({len(during[name])} and "
                f"{len(before[name])} of them)"
            )
    finally:
        engine.dispose()
