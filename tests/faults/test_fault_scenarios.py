"""Fault injection (issue #8): real processes on private services, broken while they work.

Each scenario runs a few hundred tasks through PostgreSQL, Redis, Celery worker
and beat processes, the simulator and a loopback receiver, breaks one part on a
schedule, then checks the invariants of `tests.support.faults` (every task terminal in
its true state, every terminal webhook acknowledged, duplicates under 1 %,
nothing left claimed, clean histories). Durations are shrunk through settings
(FAST_ENV) with their shapes kept; `python -m bench.soak` mixes every fault for
30 minutes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from tests.support.faults import FaultRig, PrivatePostgres, Repeating
from tests.support.receiver import Receiver, Reply
from tests.support.sim import SimulatorHandle
from tracker.clock import utcnow
from tracker.config import load_settings
from tracker.db import migrate
from tracker.db.engine import make_engine, session_factory
from tracker.db.models import WebhookAttempt, WebhookDelivery
from tracker.delivery.attempt import attempt_deliveries
from tracker.tracking.clients import create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration
from tracker.tracking.transitions import record_transition

pytestmark = pytest.mark.slow

RigFactory = Callable[..., FaultRig]


@pytest.fixture
def make_rig(simulator: SimulatorHandle, tmp_path: Path) -> Iterator[RigFactory]:
    rigs: list[FaultRig] = []

    def make(**kwargs: Any) -> FaultRig:
        rig = FaultRig(tmp_path, simulator, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()


def run_for(seconds: float, *faults: Repeating) -> None:
    time.sleep(seconds)
    for fault in faults:
        fault.stop()


def test_workers_sigkilled_every_few_seconds_while_polling_and_delivering(
    make_rig: RigFactory,
) -> None:
    # Answers take about 0.3 s, so kills also land while webhooks are in flight. 600 tasks:
    # a kill loses the answers read in the few milliseconds before their record, a rate
    # far under 1 % that 300 deliveries (3 duplicates already 1 %) cannot tell apart from it.
    rig = make_rig(receiver_delay=0.3)
    expected = rig.seed(600, spread=10)
    rig.register(expected)
    rig.start(workers=2)
    run_for(13, Repeating(2.5, lambda: rig.kill("worker")))
    figures = rig.settle_and_check(expected)
    assert figures.faults["worker SIGKILL"] >= 4
    print(figures.summary())


def test_beats_sigkilled_and_two_beats_at_once(make_rig: RigFactory) -> None:
    rig = make_rig()
    expected = rig.seed(300, spread=10)
    rig.register(expected)
    rig.start(workers=1, beats=2)
    run_for(11, Repeating(2.5, lambda: rig.kill("beat")))
    figures = rig.settle_and_check(expected)
    assert figures.faults["beat SIGKILL"] >= 3
    print(figures.summary())


def test_redis_restarted_empty_and_down_for_a_while(make_rig: RigFactory) -> None:
    """Restarts lose every queued message; a restart soon followed by an outage also
    used to end the worker (kombu fails while reconnecting): it must start afresh."""
    rig = make_rig()
    expected = rig.seed(300, spread=15)
    rig.register(expected)
    rig.start(workers=1)
    time.sleep(3)
    for outage in (2.0, 8.0):  # the 30 s, scaled like every other duration
        rig.redis.restart()  # it keeps nothing: every queued message is gone
        rig.fault("redis restart")
        time.sleep(3)
        rig.redis.stop()
        rig.fault("redis down")
        time.sleep(outage)
        rig.redis.start()
    figures = rig.settle_and_check(expected)
    print(figures.summary())


def test_postgresql_restarted_mid_run_worker_and_api_recover_on_their_own(
    make_rig: RigFactory,
) -> None:
    """Answers take 0.2 s, so the server stops while webhooks are in flight: their
    answers are recorded once it is back (a commit it acknowledged is never lost)."""
    rig = make_rig(receiver_delay=0.2)
    expected = rig.seed(300, spread=12)
    ids = list(expected)
    rig.register(ids[:150])
    rig.start(workers=1, api=True)
    accepted = list(ids[:150])
    accepted += rig.register_through_api(ids[150:200])
    time.sleep(3)
    rig.postgres.restart("fast")  # every connection dropped
    rig.fault("postgresql restart")
    accepted += rig.register_through_api(ids[200:250])
    time.sleep(2)
    rig.postgres.stop("immediate")
    rig.fault("postgresql down 4 s")
    down = rig.register_through_api(ids[250:260], timeout=5)
    time.sleep(4)
    rig.postgres.start()
    # The same API process, never restarted, takes registrations again.
    accepted += down
    for start in range(260, 300, 10):
        accepted += _until_accepted(rig, ids[start : start + 10])
    figures = rig.settle_and_check(expected, accepted=accepted)
    assert figures.tasks >= 290
    assert not [fault for fault in figures.faults if "500" in fault]  # 503 while down
    print(figures.summary())


def test_an_answer_is_recorded_when_the_database_returns_after_the_lease_ran_out(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver answers while PostgreSQL is down, and stays down past the claim's
    lease: nobody can claim the row again meanwhile, so the answer waits for the
    database and is recorded once (before, it was dropped at the lease's end and the
    webhook sent again: the soak's 54 duplicates)."""
    postgres = PrivatePostgres()
    engine = make_engine(postgres.url)
    try:
        migrate.upgrade(postgres.url)
        settings = load_settings(
            database_url=postgres.url,
            webhook_allow_private=True,
            webhook_timeout=2,
            delivery_lease=3,
            _env_file=None,
        )
        receiver.script("/hook", Reply(200, delay=1.0))
        sessions = session_factory(engine)
        with sessions.begin() as session:
            owner = create_client(session, "acme").client
            registration = TaskRegistration(task_id="t-1", callback_url=receiver.url("/hook"))
            task = register_task(session, owner, registration, settings=settings).task
            (delivery,) = record_transition(session, task, "completed", observed_at=utcnow())
            delivery_id = delivery.id
        with ThreadPoolExecutor(1) as pool, caplog.at_level(logging.WARNING, "tracker.db"):
            claimed = time.monotonic()
            attempt = pool.submit(attempt_deliveries, sessions, [delivery_id], settings=settings)
            receiver.wait_for(1)
            postgres.stop("immediate")  # the answer comes 1 s after the request
            time.sleep(max(0.0, claimed + settings.webhook_lease + 0.5 - time.monotonic()))
            postgres.start()
            (outcome,) = attempt.result(timeout=30)
        assert "recording webhook answers again shortly" in caplog.text  # it did wait
        assert (outcome.attempted, outcome.status) == (True, "succeeded")
        with sessions() as session:
            row = session.get_one(WebhookDelivery, delivery_id)
            attempts = session.scalars(select(WebhookAttempt.status_code)).all()
        assert (row.status, row.claimed_until, attempts) == ("succeeded", None, [200])
        assert len(receiver.requests) == 1
    finally:
        engine.dispose()
        postgres.close()


def _until_accepted(rig: FaultRig, ids: list[str], timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if accepted := rig.register_through_api(ids):
            return accepted
        time.sleep(0.5)
    raise AssertionError(f"the API did not accept registrations within {timeout} s")


def test_receiver_down_then_slower_than_the_timeout_then_back(make_rig: RigFactory) -> None:
    rig = make_rig()
    expected = rig.seed(250, spread=8)
    rig.register(expected)
    rig.receiver.down()  # connection refused, for many retry intervals (1-2 s)
    rig.fault("receiver down 12 s")
    rig.start(workers=1)
    time.sleep(12)
    rig.receiver.up(delay=3)  # answers after 3 s, the webhook timeout is 2 s
    rig.fault("receiver slow 6 s")
    time.sleep(6)
    rig.receiver.up(delay=0)
    figures = rig.settle_and_check(expected)
    assert figures.retries_received > 0  # the slow answers really were re-sent
    print(figures.summary())


def test_upstream_errors_rate_limits_garbage_gaps_and_a_revoked_token(
    make_rig: RigFactory, simulator: SimulatorHandle
) -> None:
    rig = make_rig(env={"TRACKER_NOT_FOUND_AFTER": "3"})
    expected = rig.seed(300, spread=24)
    unknown = {f"gone-{n}": "failed" for n in range(5)}  # the upstream never heard of them
    expected.update(unknown)
    rig.register(expected)
    rig.start(workers=1)
    phases: list[tuple[str, dict[str, Any], float]] = [
        ("upstream 500s 6 s", {"error_500_share": 1.0}, 6),
        ("upstream 429 storm 5 s", {"error_429_share": 0.8, "retry_after": 2}, 5),
        ("upstream non-JSON 4 s", {"malformed_share": 0.6}, 4),
        ("upstream missing items 5 s", {"drop_share": 0.5}, 5),
    ]
    clear = {"error_500_share": 0.0, "error_429_share": 0.0, "malformed_share": 0.0}
    for name, knobs, seconds in phases:
        simulator.configure(**{**clear, "drop_share": 0.0, **knobs})
        rig.fault(name)
        time.sleep(seconds)
    simulator.configure(**clear, drop_share=0.0, tokens=["rotated-token-0123456789"])
    rig.fault("upstream 401, token rotated by configuration")
    time.sleep(4)
    rig.restart_all(TRACKER_UPSTREAM_TOKEN="rotated-token-0123456789")
    figures = rig.settle_and_check(expected)
    statuses = simulator.stats()["requests_by_status"]
    for status in ("401", "429", "500"):
        assert statuses.get(status), f"no {status} answered: {statuses}"
    print(figures.summary())


def test_api_under_load_while_workers_are_killed(make_rig: RigFactory) -> None:
    """Registrations answered 2xx are tracked to the end; errors are allowed, loss is not.

    Four clients register 400 tasks, 5 per batch call, spread over 12 s, while a
    worker is SIGKILLed every 2.5 s and the API itself is SIGKILLed once; the
    clients send again what was not answered 2xx (registering is idempotent)."""
    rig = make_rig(receiver_delay=0.2)
    expected = rig.seed(400, spread=10)
    ids = list(expected)
    rig.start(workers=2, api=True)
    chunks = [ids[n : n + 5] for n in range(0, len(ids), 5)]
    pace = 12.0 / len(chunks)
    started = time.monotonic()

    def register(index: int) -> list[str]:
        """Like a client: send the batch, and send again what was not answered 2xx."""
        time.sleep(max(0.0, started + index * pace - time.monotonic()))
        done: list[str] = []
        deadline = time.monotonic() + 30
        while len(done) < len(chunks[index]) and time.monotonic() < deadline:
            missing = [i for i in chunks[index] if i not in done]
            done += rig.register_through_api(missing)
            if len(done) < len(chunks[index]):
                rig.fault("registration sent again")
                time.sleep(0.5)
        return done

    killer = Repeating(2.5, lambda: rig.kill("worker"))
    with ThreadPoolExecutor(4) as pool:
        pending = pool.map(register, range(len(chunks)))
        time.sleep(6)
        rig.kill("api")  # in the middle of the load; started again at once
        answers = list(pending)
    killer.stop()
    accepted = [task_id for chunk in answers for task_id in chunk]
    assert len(accepted) == len(ids), f"only {len(accepted)} of {len(ids)} accepted"
    figures = rig.settle_and_check(expected, accepted=accepted)
    assert figures.faults["worker SIGKILL"] >= 3
    assert requests.get(f"{rig.api_url}/readyz", timeout=10).status_code == 200
    print(figures.summary())
