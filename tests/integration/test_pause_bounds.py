"""A 429 pause can never outlive TRACKER_MAX_POLL_INTERVAL: not through the poll path, not
as a value stored in Redis or the database (written by an older version, or by hand)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from tests.support.sim import SimulatorHandle
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.engine import make_engine, session_factory
from tracker.db.models import Task, UpstreamCredential
from tracker.errors import BudgetUnavailable
from tracker.polling import claim_due_tasks, plan_batches, run_poll_batch
from tracker.tracking.clients import create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration
from tracker.upstream.budget import Budget, DatabaseBudget, RedisBudget, credential_key
from tracker.upstream.client import UpstreamClient

KEY = credential_key("token-under-test")
A_YEAR = 365 * 24 * 3600.0


@pytest.fixture(params=["redis", "sqlite", "postgresql"])
def budget(request: pytest.FixtureRequest) -> Iterator[Budget]:
    """A budget bounding pauses to 2 s, in Redis or the database on either backend."""
    if request.param == "redis":
        yield RedisBudget(request.getfixturevalue("redis_url"), KEY, rps=20, max_pause=2.0)
        return
    engine = make_engine(request.getfixturevalue(f"{request.param}_database_url"))
    with engine.begin() as conn:
        conn.execute(delete(UpstreamCredential))
    yield DatabaseBudget(sessionmaker(engine), KEY, rps=20, max_pause=2.0)
    engine.dispose()


def _refused_for(budget: Budget) -> float:
    with pytest.raises(BudgetUnavailable) as caught:
        budget.reserve(max_wait=10)
    return (caught.value.retry_at - utcnow()).total_seconds()


@pytest.mark.parametrize("seconds", [A_YEAR, float("inf"), float("nan")])
def test_a_pause_asked_for_longer_than_the_bound_lasts_the_bound(
    budget: Budget, seconds: float
) -> None:
    budget.pause(seconds)
    assert 1.0 < _refused_for(budget) <= 2.0


def test_a_stored_pause_longer_than_the_bound_is_cut_back_when_read(
    budget: Budget, caplog: pytest.LogCaptureFixture
) -> None:
    """As an older version (or a hand) may have left it: a year away."""
    if isinstance(budget, RedisBudget):
        key = f"tracker:budget:{KEY}:paused"
        budget._redis.set(key, str(utcnow().timestamp() + A_YEAR), ex=3600)
    else:
        with budget._sessions.begin() as session:
            budget.reserve(max_wait=10)  # creates the row
            row = session.get_one(UpstreamCredential, KEY)
            row.paused_until = utcnow() + timedelta(seconds=A_YEAR)

    assert 1.0 < _refused_for(budget) <= 2.0
    assert 1.0 < _refused_for(budget) <= 2.0  # cut back for good, not re-read as a year
    assert "cut back to 2 s" in caplog.text
    # A later, shorter pause is not extended by what was stored.
    budget.pause(0.5)
    assert _refused_for(budget) <= 2.0


@pytest.mark.parametrize("retry_after", ["inf", "1e400", "31536000"])
def test_the_poll_path_survives_an_absurd_retry_after_and_gives_the_batch_back_within_the_bound(
    db_url: str,
    redis_url: str,
    simulator: SimulatorHandle,
    settings: Settings,
    retry_after: str,
) -> None:
    """An infinite one used to raise OverflowError in the poll path; a year paused for a year."""
    settings = settings.model_copy(
        update={"upstream_url": simulator.url, "max_poll_interval": 2.0, "poll_interval": 1.0}
    )
    simulator.configure(error_429_share=1.0, retry_after=retry_after)
    [task_id] = simulator.seed([{"outcome": "completed", "duration": 0}])
    sessions = session_factory(make_engine(db_url))
    with sessions.begin() as session:
        owner = create_client(session, "acme").client
        register_task(session, owner, TaskRegistration(task_id=task_id), settings=settings)
    redis.Redis.from_url(redis_url).flushdb()
    budget = RedisBudget(redis_url, KEY, rps=20, max_pause=settings.max_poll_interval)
    upstream = UpstreamClient.from_settings(settings, max_retries=0)
    now = utcnow()
    with sessions.begin() as session:
        claims = claim_due_tasks(session, now=now, limit=10, settings=settings)
    (batch,) = plan_batches(claims, settings.batch_size)

    outcome = run_poll_batch(sessions, upstream, budget, batch, settings=settings, credential=KEY)

    assert outcome.error == "rate_limited"
    with Session(sessions.kw["bind"]) as session:
        (next_poll_at,) = session.scalars(select(Task.next_poll_at)).all()
    assert next_poll_at <= utcnow() + timedelta(seconds=2.0)
    assert 1.0 < _refused_for(budget) <= 2.0
    upstream.close()
