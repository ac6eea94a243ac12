"""The shared upstream budget, in Redis and in the database: slots 1/rps apart, pauses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, text
from sqlalchemy.orm import Session, sessionmaker

from tracker.clock import utcnow
from tracker.db.engine import make_engine
from tracker.db.models import UpstreamCredential
from tracker.errors import BudgetUnavailable
from tracker.upstream.budget import (
    SCHEDULE_MARGIN,
    Budget,
    DatabaseBudget,
    RedisBudget,
    clear_rejected,
    credential_key,
    mark_rejected,
    read_budget_state,
    rejected_since,
    slots_ahead,
    wait_for_slot,
)


@pytest.fixture(params=["redis", "sqlite", "postgresql"])
def budget(request: pytest.FixtureRequest) -> Iterator[Budget]:
    """The Redis budget, or the database budget on either backend."""
    key = credential_key("token-under-test")
    if request.param == "redis":
        yield RedisBudget(request.getfixturevalue("redis_url"), key, rps=20)
        return
    engine = make_engine(request.getfixturevalue(f"{request.param}_database_url"))
    with engine.begin() as conn:
        conn.execute(delete(UpstreamCredential))
    yield DatabaseBudget(sessionmaker(engine), key, rps=20)
    engine.dispose()


def test_slots_are_spaced_one_over_rps_across_threads(budget: Budget) -> None:
    """40 reservations from 8 threads at 20 rps take 40 distinct slots 1/rps apart."""
    waits: list[float] = []
    lock = threading.Lock()

    def reserve_five() -> None:
        for _ in range(5):
            wait = budget.reserve(max_wait=10)
            with lock:
                waits.append(wait)

    started = time.monotonic()
    threads = [threading.Thread(target=reserve_five) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    assert len(waits) == 40
    # The last slot lies 39 intervals after the first, less the time spent reserving.
    interval = SCHEDULE_MARGIN / 20
    assert max(waits) >= 39 * interval - elapsed
    assert max(waits) <= 40 * interval + 0.05


def test_a_slot_too_far_out_is_refused(budget: Budget) -> None:
    for _ in range(20):
        budget.reserve(max_wait=10)
    with pytest.raises(BudgetUnavailable):
        budget.reserve(max_wait=0.2)


def test_pause_holds_every_request(budget: Budget) -> None:
    budget.pause(2)
    with pytest.raises(BudgetUnavailable) as caught:
        budget.reserve(max_wait=10)
    assert (caught.value.retry_at - utcnow()).total_seconds() > 1


def test_a_reservation_of_several_slots_takes_them_all(budget: Budget) -> None:
    """Reserving 5 slots moves the schedule 5 intervals on: the next caller waits for them."""
    assert budget.reserve(max_wait=10, count=5) == pytest.approx(0, abs=0.05)
    assert budget.reserve(max_wait=10) == pytest.approx(5 * budget.interval, abs=0.05)


class CountingBudget:
    """A real budget, with its reservations counted."""

    def __init__(self, budget: Budget) -> None:
        self.budget, self.interval, self.reservations = budget, budget.interval, 0

    def reserve(self, *, max_wait: float, count: int = 1) -> float:
        self.reservations += 1
        return self.budget.reserve(max_wait=max_wait, count=count)

    def pause(self, seconds: float) -> None:
        self.budget.pause(seconds)


def test_slots_reserved_ahead_are_handed_out_in_order_then_asked_for_again(
    budget: Budget,
) -> None:
    """A job's 3 slots: one round trip, waits one interval apart; a 4th request reserves."""
    # Slots half a second apart: a loaded machine's round trips (tens of ms) cannot blur
    # the rounding below. Nothing sleeps: the waits are only recorded.
    budget.interval = 0.5
    counting = CountingBudget(budget)
    waits: list[float] = []
    with slots_ahead(counting, 3, max_wait=10) as ahead:
        assert ahead is not None
        for _ in range(4):
            wait_for_slot(counting, max_wait=10, sleep=waits.append)
    assert counting.reservations == 2
    interval = budget.interval
    assert [round(wait / interval) for wait in waits] == [1, 2, 3]  # the first: no wait
    # Outside the job, each request reserves its own again.
    wait_for_slot(counting, max_wait=10, sleep=waits.append)
    assert counting.reservations == 3


def test_dropped_slots_leave_requests_to_the_budget_and_its_pause(budget: Budget) -> None:
    """After upstream trouble the rest of a job's requests wait out a 429's pause."""
    with slots_ahead(budget, 4, max_wait=10) as ahead:
        assert ahead is not None
        wait_for_slot(budget, max_wait=10, sleep=lambda _: None)
        budget.pause(2)
        ahead.drop()
        with pytest.raises(BudgetUnavailable):
            wait_for_slot(budget, max_wait=10, sleep=lambda _: None)


def test_one_request_or_a_paused_budget_reserves_nothing_ahead(budget: Budget) -> None:
    with slots_ahead(budget, 1, max_wait=10) as ahead:
        assert ahead is None
    budget.pause(2)
    with slots_ahead(budget, 4, max_wait=10) as ahead:
        assert ahead is None


def test_rejection_is_recorded_once_and_cleared(session: Session) -> None:
    key = credential_key("revoked")
    assert mark_rejected(session, key, "401 invalid_token", now=utcnow())
    assert not mark_rejected(session, key, "401 invalid_token", now=utcnow())
    session.commit()
    assert rejected_since(session, key) is not None
    assert clear_rejected(session, key)
    session.commit()
    assert rejected_since(session, key) is None


def test_the_database_budget_reserves_after_the_server_dropped_its_connections(
    postgresql_database_url: str,
) -> None:
    """The one-statement reservation runs on a pool without pre-ping: after the server
    dropped its connections (a restart), that statement fails, and the budget takes the
    slot in its locking transaction instead, whose pool pings."""
    engine = make_engine(postgresql_database_url)
    with engine.begin() as conn:
        conn.execute(delete(UpstreamCredential))
    budget = DatabaseBudget(sessionmaker(engine), credential_key("dropped"), rps=20)
    try:
        budget.reserve(max_wait=10)  # creates the row
        budget.reserve(max_wait=10)  # one statement, on a pooled connection
        with engine.connect() as conn:
            dropped = conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        assert dropped
        wait = budget.reserve(max_wait=10)
        assert wait == pytest.approx(2 * SCHEDULE_MARGIN / 20, abs=0.1)
    finally:
        engine.dispose()


def test_the_budget_state_shows_slots_taken_ahead_and_a_pause(
    budget: Budget, request: pytest.FixtureRequest
) -> None:
    """What the dashboard's overview shows: how far ahead slots are taken, a 429 pause."""
    key = credential_key("token-under-test")
    redis_url = request.getfixturevalue("redis_url") if isinstance(budget, RedisBudget) else None
    if isinstance(budget, DatabaseBudget):
        sessions = budget._sessions
    else:  # the Redis budget keeps nothing in the database; any database will do
        sessions = sessionmaker(make_engine(request.getfixturevalue("sqlite_database_url")))
    with sessions() as session:
        idle = read_budget_state(session, key, rps=20, redis_url=redis_url, now=utcnow())
    assert (idle.queued_seconds, idle.paused_until) == (0.0, None)
    budget.reserve(max_wait=10, count=40)  # two seconds of slots at 20/s
    budget.pause(30)
    with sessions() as session:
        busy = read_budget_state(session, key, rps=20, redis_url=redis_url, now=utcnow())
    assert 1.5 < busy.queued_seconds <= 2.2
    assert busy.paused_until is not None
    assert 25 < (busy.paused_until - utcnow()).total_seconds() <= 30
