"""The polling loop end to end: real worker and beat processes, the simulator as upstream.

Slow by nature (processes start in seconds); each scenario uses a few hundred tasks.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.support.processes import TrackerProcesses, wait_until
from tests.support.sim import SimulatorHandle
from tracker.clock import utcnow
from tracker.config import Settings, load_settings
from tracker.db.engine import make_engine, session_factory
from tracker.db.models import Task, TaskTransition
from tracker.devtools.demo import free_port
from tracker.polling import (
    PollBatch,
    claim_due_tasks,
    plan_batches,
    poll_lease,
    run_poll_batch,
)
from tracker.states import ACTIVE_STATES, can_transition
from tracker.tracking.clients import create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration
from tracker.upstream.budget import DatabaseBudget, credential_key
from tracker.upstream.client import UpstreamClient
from tracker.worker.app import make_celery
from tracker.worker.jobs import enqueue_poll_job

pytestmark = pytest.mark.slow


def tracker_env(db_url: str, simulator: SimulatorHandle, broker: str | None) -> dict[str, str]:
    env = {
        "TRACKER_DATABASE_URL": db_url,
        "TRACKER_UPSTREAM_URL": simulator.url,
        "TRACKER_UPSTREAM_TOKEN": "test-token",
        "TRACKER_POLL_INTERVAL": "1",
        "TRACKER_MAX_POLL_INTERVAL": "2",
        "TRACKER_SWEEP_INTERVAL": "1",
        "TRACKER_POLL_LEASE": "5",
        "TRACKER_WEBHOOK_ALLOW_PRIVATE": "true",
        "TRACKER_METRICS_PORT": "0",
        "TRACKER_LOG_FORMAT": "json",
    }
    if broker:
        env["TRACKER_BROKER_URL"] = broker
    return env


@pytest.fixture
def plain_settings() -> Settings:
    """Settings for registering in-process; the database comes from each test (no db_url)."""
    return load_settings(upstream_token="test-token", _env_file=None)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[TrackerProcesses]]:
    """Collects the TrackerProcesses a test starts, and stops them all at the end."""
    started: list[TrackerProcesses] = []
    yield started
    for group in started:
        group.stop_all()


def seed_outcomes(simulator: SimulatorHandle, count: int, *, max_duration: float) -> dict[str, str]:
    """`count` simulator tasks with known outcomes; {upstream id: expected tracker state}."""
    rng = random.Random(count)
    outcomes = [rng.choice(["completed", "completed", "failed"]) for _ in range(count)]
    tasks = [
        {"service": "luma", "outcome": outcome, "duration": rng.uniform(0, max_duration)}
        for outcome in outcomes
    ]
    ids = simulator.seed(tasks)
    return dict(zip(ids, outcomes, strict=True))


def register_all(db_url: str, settings: Settings, ids: list[str], *, clients: int = 1) -> list[int]:
    engine = make_engine(db_url)
    with Session(engine) as session, session.begin():
        owners = [create_client(session, f"client-{n}").client for n in range(clients)]
        rows = []
        for owner in owners:
            for task_id in ids:
                task = register_task(
                    session, owner, TaskRegistration(task_id=task_id), settings=settings
                ).task
                rows.append(task)
        session.flush()
        row_ids = [task.id for task in rows]
    engine.dispose()
    return row_ids


def task_states(db_url: str) -> dict[tuple[int, str], str]:
    engine = make_engine(db_url)
    with Session(engine) as session:
        rows = session.execute(select(Task.client_id, Task.task_id, Task.state)).all()
    engine.dispose()
    return {(client_id, task_id): state for client_id, task_id, state in rows}


def all_terminal(db_url: str) -> bool:
    return all(state not in ACTIVE_STATES for state in task_states(db_url).values())


def assert_clean_histories(db_url: str) -> None:
    """Every task's transitions form one legal path from registration, without repeats."""
    engine = make_engine(db_url)
    with Session(engine) as session:
        rows = session.execute(
            select(
                TaskTransition.task_row_id, TaskTransition.from_state, TaskTransition.to_state
            ).order_by(TaskTransition.id)
        ).all()
    engine.dispose()
    paths: dict[int, list[tuple[str | None, str]]] = {}
    for row_id, from_state, to_state in rows:
        paths.setdefault(row_id, []).append((from_state, to_state))
    for row_id, path in paths.items():
        assert path[0] == (None, "pending"), f"task {row_id}: {path}"
        for (_, previous_to), (from_state, to_state) in itertools.pairwise(path):
            assert from_state == previous_to, f"task {row_id} skipped a step: {path}"
            assert can_transition(previous_to, to_state), f"task {row_id}: {path}"


@pytest.mark.parametrize(
    ("backend", "use_redis"),
    [("postgresql", True), ("sqlite", False)],
    ids=["postgresql+redis", "sqlite+embedded-broker"],
)
def test_registered_tasks_reach_their_true_terminal_state(
    request: pytest.FixtureRequest,
    backend: str,
    use_redis: bool,
    simulator: SimulatorHandle,
    processes: list[TrackerProcesses],
    tmp_path: Path,
    plain_settings: Settings,
) -> None:
    db_url = _fresh(request, backend)
    broker = request.getfixturevalue("broker") if use_redis else None
    expected = seed_outcomes(simulator, 500, max_duration=4)
    register_all(db_url, plain_settings, list(expected))
    env = tracker_env(db_url, simulator, broker)
    env["TRACKER_METRICS_PORT"] = str(metrics_port := free_port())
    group = TrackerProcesses(env, tmp_path)
    processes.append(group)
    group.worker()
    group.beat()
    try:
        wait_until(lambda: all_terminal(db_url), timeout=120, what="every task terminal")
    except AssertionError:
        print(group.logs())
        raise
    states = task_states(db_url)
    assert {task_id: state for (_, task_id), state in states.items()} == expected
    assert_clean_histories(db_url)
    # The worker serves its own metrics: every registration was compared with an answer.
    scraped = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    observed = re.search(r"^tracker_poll_observations_total (\S+)$", scraped, re.MULTILINE)
    assert observed is not None, scraped[:2000]
    assert float(observed.group(1)) >= len(expected)


def _fresh(request: pytest.FixtureRequest, backend: str) -> str:
    """The session's database of `backend`, emptied (what the `db_url` fixture does)."""
    from tests.conftest import _empty, _engine_for

    url: str = request.getfixturevalue(f"{backend}_database_url")
    _empty(_engine_for(url))
    return url


def test_each_tick_asks_for_each_distinct_id_once(
    db_url: str, simulator: SimulatorHandle, settings: Settings
) -> None:
    """100 ids, 20 of them watched by three clients: two retrieve_batch calls, each id once."""
    seed = {"service": "luma", "outcome": "completed", "duration": 600, "age": 10}
    ids = simulator.seed([seed] * 100)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        owners = [create_client(session, name).client for name in ("a", "b", "c")]
        for index, task_id in enumerate(ids):
            for owner in owners if index < 20 else owners[:1]:
                register_task(session, owner, TaskRegistration(task_id=task_id), settings=settings)
    before = simulator.stats()
    with sessions.begin() as session:
        claims = claim_due_tasks(session, now=utcnow(), limit=1000, settings=settings)
    assert len(claims) == 140
    batches = plan_batches(claims, settings.batch_size)
    upstream = UpstreamClient.from_settings(
        settings.model_copy(update={"upstream_url": simulator.url}), max_retries=0
    )
    budget = DatabaseBudget(sessions, credential_key("test-token"), settings.upstream_rps)
    for batch in batches:
        run_poll_batch(sessions, upstream, budget, batch, settings=settings, credential="tok_test")
    after = simulator.stats()
    calls = after["retrieve_batch_calls"] - before["retrieve_batch_calls"]
    assert calls == math.ceil(100 / settings.batch_size) == len(batches)
    assert after["items_requested"] - before["items_requested"] == 100
    with Session(engine) as session:
        running = session.scalars(select(Task.state)).all()
    assert set(running) == {"running"}
    engine.dispose()


def test_a_poll_job_still_queued_when_its_lease_ends_is_discarded_unrun(
    pg_url: str,
    broker: str,
    simulator: SimulatorHandle,
    processes: list[TrackerProcesses],
    tmp_path: Path,
    plain_settings: Settings,
) -> None:
    """Workers a lease behind: the job that waited past its lease is discarded by the
    worker that takes it, unrun (the next tick claims its task again); the job whose
    lease is still running polls."""
    seed = {"service": "luma", "outcome": "completed", "duration": 600, "age": 10}
    late_id, live_id = simulator.seed([seed] * 2)
    register_all(pg_url, plain_settings, [late_id, live_id])
    settings = plain_settings.model_copy(update={"poll_interval": 60, "poll_lease": 60})
    engine = make_engine(pg_url)
    with session_factory(engine).begin() as session:
        claims = claim_due_tasks(session, now=utcnow(), limit=10, settings=settings)
    (batch,) = plan_batches(claims, settings.batch_size)
    assert batch.seen is not None

    def alone(task_id: str, lease_until: datetime | None) -> PollBatch:
        seen = {task_id: batch.seen[task_id]} if batch.seen else None
        return replace(batch, task_ids=(task_id,), lease_until=lease_until, seen=seen)

    app = make_celery(load_settings(broker_url=broker, _env_file=None))
    enqueue_poll_job([alone(late_id, utcnow() + timedelta(seconds=1))], app)
    enqueue_poll_job([alone(live_id, batch.lease_until)], app)
    app.close()
    requested = simulator.stats()["items_requested"]
    time.sleep(1.5)  # the first job's lease ends while no worker runs
    group = TrackerProcesses(tracker_env(pg_url, simulator, broker), tmp_path)
    processes.append(group)
    group.worker(concurrency=2)

    def state(task_id: str) -> str:
        return next(s for (_, t), s in task_states(pg_url).items() if t == task_id)

    wait_until(lambda: state(live_id) == "running", timeout=60, what="the live job polled")
    wait_until(lambda: "was discarded" in group.logs(), timeout=30, what="the late job discarded")
    assert simulator.stats()["items_requested"] == requested + 1  # the live id alone
    assert state(late_id) == "pending"
    engine.dispose()


def test_two_beats_and_three_workers_write_each_transition_once(
    pg_url: str,
    broker: str,
    simulator: SimulatorHandle,
    processes: list[TrackerProcesses],
    tmp_path: Path,
    plain_settings: Settings,
) -> None:
    db_url = pg_url
    expected = seed_outcomes(simulator, 300, max_duration=6)
    register_all(db_url, plain_settings, list(expected), clients=2)
    group = TrackerProcesses(tracker_env(db_url, simulator, broker), tmp_path)
    processes.append(group)
    for _ in range(3):
        group.worker(concurrency=4)
    group.beat()
    group.beat()
    wait_until(lambda: all_terminal(db_url), timeout=120, what="every task terminal")
    states = task_states(db_url)
    assert {(task_id, state) for (_, task_id), state in states.items()} == set(expected.items())
    assert_clean_histories(db_url)


def test_flushing_redis_mid_run_loses_no_task(
    pg_url: str,
    broker: str,
    simulator: SimulatorHandle,
    processes: list[TrackerProcesses],
    tmp_path: Path,
    plain_settings: Settings,
) -> None:
    db_url = pg_url
    expected = seed_outcomes(simulator, 200, max_duration=8)
    register_all(db_url, plain_settings, list(expected))
    group = TrackerProcesses(tracker_env(db_url, simulator, broker), tmp_path)
    processes.append(group)
    group.worker()
    group.beat()
    wait_until(lambda: simulator.stats()["retrieve_batch_calls"] > 3, timeout=30, what="polling")
    redis.Redis.from_url(broker).flushdb()  # every queued message is gone
    wait_until(lambda: all_terminal(db_url), timeout=120, what="every task terminal")
    states = task_states(db_url)
    assert {task_id: state for (_, task_id), state in states.items()} == expected


def test_capped_and_rate_limited_upstream_still_finishes_every_task_within_budget(
    pg_url: str,
    broker: str,
    simulator: SimulatorHandle,
    processes: list[TrackerProcesses],
    tmp_path: Path,
    plain_settings: Settings,
) -> None:
    """Batch answers capped at 7 items and 429s on a third of requests: all end, 0 over budget."""
    db_url = pg_url
    simulator.configure(batch_cap=7, error_429_share=0.33, retry_after=1, rate_limit_rps=20)
    expected = seed_outcomes(simulator, 200, max_duration=3)
    register_all(db_url, plain_settings, list(expected))
    env = tracker_env(db_url, simulator, broker)
    env["TRACKER_NOT_FOUND_AFTER"] = "3"
    group = TrackerProcesses(env, tmp_path)
    processes.append(group)
    group.worker()
    group.beat()
    try:
        wait_until(lambda: all_terminal(db_url), timeout=150, what="every task terminal")
    except AssertionError:
        print(group.logs())
        raise
    states = task_states(db_url)
    assert {task_id: state for (_, task_id), state in states.items()} == expected
    stats: dict[str, Any] = simulator.stats()
    assert stats["over_budget"] == 0


def test_a_batch_reached_after_its_lease_polls_what_no_later_tick_has_taken(
    db_url: str, simulator: SimulatorHandle, settings: Settings
) -> None:
    """A job that starts after its lease ended takes again the registrations still carrying
    it and polls them; those a later tick claimed meanwhile are left to that tick's job."""
    ids = simulator.seed([{"service": "luma", "outcome": "completed", "duration": 600}] * 3)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        owner = create_client(session, "a").client
        for task_id in ids:
            register_task(session, owner, TaskRegistration(task_id=task_id), settings=settings)
    upstream = UpstreamClient.from_settings(
        settings.model_copy(update={"upstream_url": simulator.url}), max_retries=0
    )
    budget = DatabaseBudget(sessions, credential_key("test-token"), settings.upstream_rps)
    calls = simulator.stats()["retrieve_batch_calls"]

    def claim(at: datetime, limit: int = 10) -> PollBatch:
        with sessions.begin() as session:
            claims = claim_due_tasks(session, now=at, limit=limit, settings=settings)
        (batch,) = plan_batches(claims, settings.batch_size)
        return batch

    def poll(batch: PollBatch, at: datetime) -> str | None:
        outcome = run_poll_batch(
            sessions,
            upstream,
            budget,
            batch,
            settings=settings,
            credential="tok_test",
            clock=lambda: at,
        )
        return outcome.error

    def polls() -> list[int]:
        with Session(engine) as session:
            return list(session.scalars(select(Task.polls).order_by(Task.task_id)))

    lease = timedelta(seconds=poll_lease(settings, 0.0))
    claimed_at = utcnow()
    late = claim(claimed_at)
    # The next poll of each is due before the lease ends, less a second: a tick at that
    # moment claims one of them (limit 1), the others are still the late job's.
    retaken = claim(claimed_at + timedelta(seconds=settings.poll_interval) + lease, limit=1)
    assert len(retaken.task_ids) == 1
    assert poll(late, claimed_at + lease + timedelta(seconds=settings.poll_interval)) is None
    assert simulator.stats()["retrieve_batch_calls"] == calls + 1
    assert sorted(polls()) == [1, 1, 2]  # each counted once per claim; polled once each

    # Much later, a tick has claimed all three: the late job, run again, polls nothing.
    everything = claim(utcnow() + timedelta(hours=1))
    assert poll(late, utcnow() + timedelta(hours=1)) == "lease_expired"
    assert simulator.stats()["retrieve_batch_calls"] == calls + 1
    assert len(everything.task_ids) == 3
    upstream.close()
    engine.dispose()
