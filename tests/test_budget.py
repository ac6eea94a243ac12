"""The shared upstream budget, in Redis and in the database: slots 1/rps apart, pauses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from tracker.budget import (
    SCHEDULE_MARGIN,
    Budget,
    BudgetUnavailable,
    DatabaseBudget,
    RedisBudget,
    clear_rejected,
    credential_key,
    mark_rejected,
    rejected_since,
)
from tracker.db import make_engine
from tracker.models import UpstreamCredential
from tracker.timeutil import utcnow


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


def test_rejection_is_recorded_once_and_cleared(session: Session) -> None:
    key = credential_key("revoked")
    assert mark_rejected(session, key, "401 invalid_token", now=utcnow())
    assert not mark_rejected(session, key, "401 invalid_token", now=utcnow())
    session.commit()
    assert rejected_since(session, key) is not None
    assert clear_rejected(session, key)
    session.commit()
    assert rejected_since(session, key) is None
