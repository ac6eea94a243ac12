"""Destinations against real receivers on loopback, on SQLite and PostgreSQL: the limit of
attempts in flight, fair claims, the circuit breaker (open, probe, recover, disable,
resume) and the operational events each real scenario sends."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from tests.support.receiver import Receiver, Reply
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.models import Task, WebhookDelivery, WebhookDestination
from tracker.delivery.attempt import attempt_deliveries
from tracker.delivery.destinations import (
    disable_failing_destinations,
    insert_destination,
    list_destinations,
    resume_destination,
)
from tracker.delivery.operations import destination_event, queue_operational_events
from tracker.delivery.outbox import due_delivery_ids
from tracker.delivery.outcome import DeliveryOutcome
from tracker.delivery.signing import verify
from tracker.tracking.clients import NewClient, update_client_settings
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration
from tracker.tracking.transitions import record_transition


class Clock:
    """Real UTC time, shifted forward by `advance`: retries and probes come due at once."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ops() -> Iterator[Receiver]:
    """The client's operations receiver (a destination of its own)."""
    server = Receiver()
    yield server
    server.close()


def tuned(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update=changes)


def add_events(
    session: Session, client: NewClient, url: str, task_id: str, *, clock: Clock
) -> list[str]:
    """A registration to `url` that goes running, then completed: the running event is
    superseded while pending, so its completed event is the one that goes."""
    registration = TaskRegistration(
        task_id=task_id, callback_url=url, events=["task.running", "task.completed"]
    )
    task = register_task(session, client.client, registration, now=clock()).task
    ids = []
    for state in ("running", "completed"):
        ids += [
            d.id
            for d in record_transition(
                session, task, state, observed_at=clock(), upstream_state=state
            )
        ]
    session.commit()
    return ids


def work(engine: Engine, settings: Settings, clock: Clock) -> list[DeliveryOutcome]:
    """One round of a worker: the sweep's due deliveries, attempted (with the pump)."""
    with Session(engine) as session, session.begin():
        due = due_delivery_ids(session, now=clock(), limit=1000)
    if not due:
        return []
    return attempt_deliveries(engine, due, settings=settings, clock=clock, pump=True)


def destination(engine: Engine, origin_port: int) -> WebhookDestination:
    with Session(engine, expire_on_commit=False) as session:
        row = session.scalars(
            select(WebhookDestination).where(WebhookDestination.origin.endswith(f":{origin_port}"))
        ).one()
        session.expunge(row)
        return row


def statuses(engine: Engine) -> dict[str, tuple[str, int, str | None]]:
    """Every task delivery not superseded: status, attempts, failure code."""
    with Session(engine) as session:
        return {
            row.id: (row.status, row.attempts, row.failure_code)
            for row in session.execute(
                select(
                    WebhookDelivery.id,
                    WebhookDelivery.status,
                    WebhookDelivery.attempts,
                    WebhookDelivery.failure_code,
                ).where(
                    WebhookDelivery.task_row_id.is_not(None),
                    WebhookDelivery.status != "superseded",
                )
            )
        }


def ops_events(ops: Receiver, client: NewClient) -> list[dict[str, Any]]:
    """The operational events received, each signature verified (the tests' clock runs
    ahead, so against the webhook's own timestamp)."""
    events = []
    for request in ops.requests:
        verify(
            client.webhook_secret,
            request.headers,
            request.body,
            now=float(request.headers["webhook-timestamp"]),
        )
        events.append(json.loads(request.body))
    return events


def test_a_receiver_down_and_back_loses_nothing_exhausts_nothing_and_keeps_order(
    engine: Engine,
    session: Session,
    settings: Settings,
    client: NewClient,
    clock: Clock,
    ops: Receiver,
) -> None:
    """The circuit opens after 3 failures, holds the rest with their attempt counts while a
    probe goes every interval, and when the receiver is back the probe closes it and the
    backlog goes out, each registration's events in order; each step tells the operations
    URL."""
    settings = tuned(
        settings,
        destination_failures=3,
        destination_probe=30.0,
        webhook_retry_schedule=(0.0, 1.0, 1.0),  # without the breaker: exhausted at once
        webhook_timeout=2.0,
    )
    update_client_settings(session, client.client.id, {"operations_url": ops.url("/ops")})
    session.commit()
    down = Receiver()
    port = down.port
    url = down.url("/hook")
    down.close()  # the receiver is down: connections are refused
    for n in range(6):
        add_events(session, client, url, f"task-{n}", clock=clock)

    for _ in range(6):  # rounds of the worker, a retry interval apart
        work(engine, settings, clock)
        clock.advance(1.5)
    opened = destination(engine, port)
    assert opened.state == "open"
    assert opened.consecutive_failures >= 3
    held = statuses(engine)
    assert all(status == "pending" for status, _, _ in held.values()), held
    attempts_while_open = sum(attempts for _, attempts, _ in held.values())

    for _ in range(3):  # the receiver is still down: one probe per interval, nothing more
        clock.advance(31)
        work(engine, settings, clock)
    after_probes = statuses(engine)
    assert all(status == "pending" for status, _, _ in after_probes.values())
    assert sum(attempts for _, attempts, _ in after_probes.values()) == attempts_while_open + 3

    back = Receiver(port=port)  # the receiver comes back on the same address
    try:
        clock.advance(31)
        for _ in range(10):
            if not work(engine, settings, clock):
                break
        assert destination(engine, port).state == "healthy"
        final = statuses(engine)
        assert {status for status, _, _ in final.values()} == {"succeeded"}, final
        received = [r.headers["webhook-id"] for r in back.requests]
        assert sorted(received) == sorted(final), "each delivery exactly once after recovery"
        for n in range(6):  # per registration: never the superseded running event
            kinds = [
                json.loads(r.body)["type"]
                for r in back.requests
                if json.loads(r.body)["data"]["task_id"] == f"task-{n}"
            ]
            assert kinds == ["task.completed"], (n, kinds)
    finally:
        back.close()
    for _ in range(3):  # the operational events go out like any webhook
        work(engine, settings, clock)
    kinds = [event["type"] for event in ops_events(ops, client)]
    assert "destination.opened" in kinds
    assert kinds[-1] == "destination.recovered"
    assert kinds.index("destination.opened") < kinds.index("destination.recovered")
    opened_event = next(e for e in ops_events(ops, client) if e["type"] == "destination.opened")
    assert opened_event["data"]["destination"]["url"] == f"http://127.0.0.1:{port}"
    assert "could not connect" in opened_event["data"]["last_error"]


def test_the_probe_that_closes_a_circuit_rings_what_it_held_at_once(
    engine: Engine, session: Session, settings: Settings, client: NewClient, clock: Clock
) -> None:
    """When a probe's 2xx closes the circuit, its outcome carries the held deliveries as
    follow-ups (the worker rings them at once), not left to the next sweep."""
    settings = tuned(
        settings,
        destination_failures=2,
        destination_probe=30.0,
        webhook_retry_schedule=(0.0, 1.0, 1.0, 1.0, 1.0),
        webhook_timeout=2.0,
    )
    down = Receiver()
    port, url = down.port, down.url("/hook")
    down.close()
    for n in range(4):
        add_events(session, client, url, f"task-{n}", clock=clock)
    for _ in range(3):
        work(engine, settings, clock)
        clock.advance(1.5)
    assert destination(engine, port).state == "open"
    back = Receiver(port=port)
    try:
        clock.advance(31)
        with Session(engine) as fresh, fresh.begin():
            due = due_delivery_ids(fresh, now=clock(), limit=100)
        outcomes = attempt_deliveries(engine, due, settings=settings, clock=clock)
        probe = [o for o in outcomes if o.attempted and o.status == "succeeded"]
        assert len(probe) == 1, outcomes
        assert destination(engine, port).state == "healthy"
        held = {i for i, (status, _, _) in statuses(engine).items() if status == "pending"}
        assert len(held) == 3
        assert held <= {i for o in outcomes for i in o.follow_up_ids}
    finally:
        back.close()


def test_no_more_than_the_limit_of_attempts_is_in_flight_to_one_destination(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """Three workers' jobs at once, 24 deliveries to a receiver answering in 0.2 s, a limit
    of 3: never more than 3 requests open at the receiver, and every delivery goes."""
    settings = tuned(settings, destination_concurrency=3)
    receiver.default_reply = Reply(delay=0.2)
    ids = []
    for n in range(24):
        ids += add_events(session, client, receiver.url(), f"task-{n}", clock=Clock())[-1:]
    batches = [ids[0::3], ids[1::3], ids[2::3]]
    threads = [
        threading.Thread(
            target=attempt_deliveries,
            args=(engine, batch),
            kwargs={"settings": settings, "pump": True},
        )
        for batch in batches
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    clock = Clock()
    for _ in range(20):  # what the jobs left (order waits) comes in later rounds
        if not work(engine, settings, clock):
            break
    spans = [(r.at, r.answered[0]) for r in receiver.requests if r.answered]
    most = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert most <= 3, f"{most} requests in flight at once"
    assert {status for status, _, _ in statuses(engine).values()} == {"succeeded"}


def test_the_sweep_takes_due_deliveries_fairly_across_destinations(
    engine: Engine, session: Session, client: NewClient
) -> None:
    """100 due to one destination and 3 to another: a sweep of 10 takes all 3."""
    clock = Clock()
    for n in range(50):
        add_events(session, client, "http://busy.example.com/hook", f"busy-{n}", clock=clock)
    quiet = []
    for n in range(3):
        registration = TaskRegistration(
            task_id=f"quiet-{n}", callback_url="http://quiet.example.com/"
        )
        task = register_task(session, client.client, registration, now=clock()).task
        quiet += [d.id for d in record_transition(session, task, "completed", observed_at=clock())]
    session.commit()
    with Session(engine) as fresh, fresh.begin():
        taken = due_delivery_ids(fresh, now=clock() + timedelta(seconds=1), limit=10)
    assert len(taken) == 10
    assert set(quiet) <= set(taken)


def test_the_sweep_rings_a_probe_when_it_is_due_not_a_grace_later(
    engine: Engine, session: Session, client: NewClient
) -> None:
    """The sweep looks for deliveries overdue by its grace (their doorbell was lost), but
    a probe has no doorbell: it is taken once due."""
    clock = Clock()
    ids = add_events(session, client, "http://down.example.com/hook", "t-1", clock=clock)
    with Session(engine) as fresh, fresh.begin():
        insert_destination(fresh, client.client.id, "http://down.example.com:80", now=clock())
        fresh.execute(
            update(WebhookDestination).values(
                state="open", next_probe_at=clock() + timedelta(seconds=1)
            )
        )
    later = clock() + timedelta(seconds=2)
    with Session(engine) as fresh, fresh.begin():
        grace_only = due_delivery_ids(fresh, now=later - timedelta(seconds=10), limit=10)
        on_time = due_delivery_ids(
            fresh, now=later - timedelta(seconds=10), probes_at=later, limit=10
        )
    assert grace_only == []
    assert on_time == ids[-1:]


def test_a_destination_failing_too_long_is_disabled_and_resume_releases_it(
    engine: Engine,
    session: Session,
    settings: Settings,
    client: NewClient,
    clock: Clock,
    ops: Receiver,
    receiver: Receiver,
) -> None:
    settings = tuned(
        settings, destination_failures=2, destination_disable_after=3600.0, webhook_timeout=2.0
    )
    update_client_settings(session, client.client.id, {"operations_url": ops.url("/ops")})
    session.commit()
    receiver.default_reply = Reply(500)
    for n in range(3):
        add_events(session, client, receiver.url(), f"task-{n}", clock=clock)
    for _ in range(4):
        work(engine, settings, clock)
        clock.advance(6)
    assert destination(engine, receiver.port).state == "open"

    clock.advance(3600)
    with Session(engine) as fresh, fresh.begin():
        changes = disable_failing_destinations(fresh, settings=settings, now=clock())
        queue_operational_events(fresh, [destination_event(c) for c in changes], now=clock())
    assert [c.event for c in changes] == ["destination.disabled"]
    assert {code for _, _, code in statuses(engine).values()} == {"destination_disabled"}
    work(engine, settings, clock)
    assert [e["type"] for e in ops_events(ops, client)][-1] == "destination.disabled"

    receiver.default_reply = Reply(200)
    with Session(engine) as fresh, fresh.begin():
        resumed = resume_destination(
            fresh, destination(engine, receiver.port).id, client_id=client.client.id, now=clock()
        )
        assert resumed.state == "healthy"
    for _ in range(5):
        if not work(engine, settings, clock):
            break
    assert {status for status, _, _ in statuses(engine).values()} == {"succeeded"}


def test_failing_and_exhausted_deliveries_are_told_but_never_about_the_operations_url(
    engine: Engine,
    session: Session,
    settings: Settings,
    client: NewClient,
    clock: Clock,
    ops: Receiver,
    receiver: Receiver,
) -> None:
    """A delivery failing its 4th attempt sends `delivery.failing`, and after the last one
    `delivery.exhausted`; the operations receiver failing too causes no event about it."""
    settings = tuned(settings, webhook_retry_schedule=(0.0, 1.0, 1.0, 1.0, 1.0))
    update_client_settings(session, client.client.id, {"operations_url": ops.url("/ops")})
    session.commit()
    receiver.default_reply = Reply(500)
    registration = TaskRegistration(task_id="task-1", callback_url=receiver.url())
    task = register_task(session, client.client, registration, now=clock()).task
    (delivery,) = record_transition(session, task, "completed", observed_at=clock())
    session.commit()
    for _ in range(7):
        work(engine, settings, clock)
        clock.advance(1.5)
    events = ops_events(ops, client)
    assert [e["type"] for e in events] == ["delivery.failing", "delivery.exhausted"]
    failing = events[0]["data"]
    assert failing["delivery"]["id"] == delivery.id
    assert failing["delivery"]["task_id"] == "task-1"
    assert failing["delivery"]["attempts"] == 4
    assert failing["last_status_code"] == 500

    ops.default_reply = Reply(500)  # now the operations URL fails too
    task2 = register_task(
        session,
        client.client,
        TaskRegistration(task_id="task-2", callback_url=receiver.url()),
        now=clock(),
    ).task
    record_transition(session, task2, "completed", observed_at=clock())
    session.commit()
    for _ in range(12):
        work(engine, settings, clock)
        clock.advance(1.5)
    with Session(engine) as fresh:
        operational = fresh.scalars(
            select(WebhookDelivery.event).where(WebhookDelivery.task_row_id.is_(None))
        ).all()
    # Two events about task-2's delivery; none about the failing operational events.
    assert sorted(operational) == sorted(["delivery.failing", "delivery.exhausted"] * 2)


def test_destinations_are_listed_with_their_held_deliveries(
    engine: Engine, session: Session, client: NewClient, clock: Clock
) -> None:
    add_events(session, client, "https://Hooks.Example.com/a", "task-1", clock=clock)
    with Session(engine) as fresh, fresh.begin():
        attempt_ids = due_delivery_ids(fresh, now=clock(), limit=10)
        assert attempt_ids
        from tracker.delivery.claims import claim_batch

        claim_batch(fresh, attempt_ids, now=clock(), lease_seconds=30)
    with Session(engine) as fresh:
        (item,) = list_destinations(fresh, client_id=client.client.id)
        count = fresh.scalar(select(func.count()).select_from(Task))
    assert count == 1
    assert item["url"] == "https://hooks.example.com:443"
    assert (item["scheme"], item["host"], item["port"]) == ("https", "hooks.example.com", 443)
    assert item["state"] == "healthy"
    assert item["held_deliveries"] == 1  # the running event was superseded
