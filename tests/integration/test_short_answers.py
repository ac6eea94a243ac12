"""Batches ask for what they mean: `limit` equal to the ids, and a short answer asked again.

Some of the vendor's task endpoints page their answers, with default limits as small
as 12, and none documents a maximum: an id missing from a short answer is not a miss
until it was asked for again, in the same poll, within the request budget.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from tests.support.sim import SimulatorHandle
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.engine import make_engine, session_factory
from tracker.db.models import Task
from tracker.polling import claim_due_tasks, plan_batches, run_poll_batch
from tracker.tracking.clients import create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration
from tracker.upstream.budget import DatabaseBudget, credential_key
from tracker.upstream.client import UpstreamClient


def _poll_once(db_url: str, simulator: SimulatorHandle, settings: Settings, count: int) -> dict:
    """Register `count` settled tasks, claim them in one tick and poll every batch once."""
    ids = simulator.seed([{"service": "luma", "outcome": "completed", "duration": 0}] * count)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        owner = create_client(session, "a").client
        for task_id in ids:
            register_task(session, owner, TaskRegistration(task_id=task_id), settings=settings)
    with sessions.begin() as session:
        claims = claim_due_tasks(session, now=utcnow(), limit=1000, settings=settings)
    upstream = UpstreamClient.from_settings(
        settings.model_copy(update={"upstream_url": simulator.url}), max_retries=0
    )
    budget = DatabaseBudget(sessions, credential_key("test-token"), settings.upstream_rps)
    calls = simulator.stats()["retrieve_batch_calls"]
    for batch in plan_batches(claims, settings.batch_size):
        run_poll_batch(sessions, upstream, budget, batch, settings=settings, credential="tok")
    with Session(engine) as session:
        states = list(session.execute(select(Task.state, Task.polls)))
    upstream.close()
    engine.dispose()
    return {"states": states, "calls": simulator.stats()["retrieve_batch_calls"] - calls}


def test_a_batch_asks_with_a_limit_equal_to_its_ids(
    db_url: str, simulator: SimulatorHandle, settings: Settings
) -> None:
    """An upstream that pages answers 12 items unless asked for more: one request, all seen."""
    simulator.configure(default_limit=12)
    polled = _poll_once(db_url, simulator, settings, 30)
    assert polled["calls"] == 1
    assert sorted(polled["states"]) == [("completed", 1)] * 30


def test_ids_missing_from_a_short_answer_are_asked_again_in_the_same_poll(
    db_url: str, simulator: SimulatorHandle, settings: Settings
) -> None:
    """An upstream answering at most 12 items: 30 ids take 12 + 12 + 6, all in the poll they
    were due, none counted as a miss."""
    simulator.configure(batch_cap=12)
    polled = _poll_once(db_url, simulator, settings, 30)
    assert polled["calls"] == 3
    assert sorted(polled["states"]) == [("completed", 1)] * 30


def test_ids_the_upstream_does_not_have_are_asked_again_once_then_missed(
    db_url: str, simulator: SimulatorHandle, settings: Settings
) -> None:
    """A short answer for want of the ids (gone upstream) costs one more request, not more;
    then each id counts a miss."""
    simulator.configure(drop_share=1.0)
    polled = _poll_once(db_url, simulator, settings, 5)
    assert polled["calls"] == 2
    assert sorted(polled["states"]) == [("pending", 1)] * 5
