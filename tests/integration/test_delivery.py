"""Webhook delivery against a real receiver on loopback, on SQLite and PostgreSQL.

Deliveries are created the way production creates them: `register_task`, then
`record_transition`. The only fake is the DNS resolver of the SSRF tests.
"""

from __future__ import annotations

import logging
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from tests.support.processes import wait_until
from tests.support.receiver import Receiver, Reply
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.engine import autocommit_engine
from tracker.db.models import Task, WebhookAttempt, WebhookDelivery
from tracker.delivery.attempt import attempt_deliveries, attempt_delivery
from tracker.delivery.claims import claim_deliveries, claim_delivery
from tracker.delivery.outbox import due_delivery_ids, redeliver
from tracker.delivery.outcome import DeliveryOutcome
from tracker.delivery.retries import next_retry_delay
from tracker.delivery.sender import WebhookAnswer, new_http_session
from tracker.delivery.settler import Settler
from tracker.errors import Conflict, DeliveryNotFound
from tracker.tracking.clients import NewClient, create_client, rotate_secret
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration
from tracker.tracking.transitions import record_transition


class Clock:
    """Real UTC time, shifted forward by `advance` so retries come due without sleeping."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


def tune(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update=changes)


def new_task(
    session: Session,
    client: NewClient,
    settings: Settings,
    url: str,
    *,
    task_id: str = "task-1",
    events: list[str] | None = None,
) -> Task:
    registration = TaskRegistration.model_validate(
        {"task_id": task_id, "callback_url": url}
        | ({"events": events} if events is not None else {})
    )
    task = register_task(session, client.client, registration, settings=settings).task
    session.commit()
    return task


def transition(session: Session, task: Task, state: str) -> WebhookDelivery | None:
    """Record a state change through the real code path; the delivery it created, if any."""
    created = record_transition(
        session,
        task,
        state,
        observed_at=utcnow(),
        record={"id": task.task_id, "response": {"state": state}},
        upstream_state=state,
    )
    session.commit()
    return created[0] if created else None


def completed_delivery(
    session: Session, client: NewClient, settings: Settings, url: str, *, task_id: str = "task-1"
) -> str:
    delivery = transition(
        session, new_task(session, client, settings, url, task_id=task_id), "completed"
    )
    assert delivery is not None
    return delivery.id


def load(engine: Engine, delivery_id: str) -> tuple[WebhookDelivery, list[WebhookAttempt]]:
    with Session(engine) as session:
        delivery = session.get_one(WebhookDelivery, delivery_id)
        attempts = list(
            session.scalars(
                select(WebhookAttempt)
                .where(WebhookAttempt.delivery_id == delivery_id)
                .order_by(WebhookAttempt.attempt)
            )
        )
        session.expunge_all()
    return delivery, attempts


def run_in_threads(*calls: Callable[[], DeliveryOutcome]) -> list[DeliveryOutcome]:
    """Run the calls at once, one thread each; their outcomes in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result(timeout=30) for future in futures]


def test_a_webhook_verifies_with_the_reference_library_and_is_logged(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    delivery_id = completed_delivery(session, client, settings, receiver.url())

    outcome = attempt_delivery(engine, delivery_id, settings=settings)

    assert outcome.attempted
    assert outcome.status == "succeeded"
    assert outcome.status_code == 200
    (request,) = receiver.requests
    payload = Webhook(client.webhook_secret).verify(request.body, request.headers)
    assert payload["type"] == "task.completed"
    assert payload["data"]["task_id"] == "task-1"
    assert request.headers["webhook-id"] == delivery_id
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("tracker/")
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    delivery, attempts = load(engine, delivery_id)
    assert request.body == delivery.payload.encode()
    assert (delivery.status, delivery.attempts, delivery.last_status_code) == ("succeeded", 1, 200)
    assert delivery.delivered_at is not None
    assert delivery.claimed_until is None
    assert delivery.next_attempt_at is None
    assert delivery.failure is None
    (attempt,) = attempts
    assert (attempt.attempt, attempt.status_code, attempt.response_excerpt) == (1, 200, "ok")
    assert attempt.error is None
    assert attempt.duration_ms >= 0


def test_500_500_200_is_attempted_three_times_with_the_same_webhook_id(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    settings = tune(settings, webhook_retry_schedule=(0.0, 5.0, 5.0, 5.0))
    receiver.script("/hook", Reply(500, body=b"boom"), Reply(500))
    delivery_id = completed_delivery(session, client, settings, receiver.url())
    clock = Clock()

    first = attempt_delivery(engine, delivery_id, settings=settings, clock=clock)
    assert (first.status, first.status_code) == ("pending", 500)
    assert first.next_attempt_at is not None
    assert 3.9 <= (first.next_attempt_at - clock()).total_seconds() <= 6.1  # 5 s +-20 %
    early = attempt_delivery(engine, delivery_id, settings=settings, clock=clock)
    assert (early.attempted, early.skipped) == (False, "not_due")
    clock.advance(6.1)
    assert attempt_delivery(engine, delivery_id, settings=settings, clock=clock).status_code == 500
    clock.advance(6.1)
    third = attempt_delivery(engine, delivery_id, settings=settings, clock=clock)

    assert (third.status, third.attempt) == ("succeeded", 3)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [delivery_id] * 3
    for request in receiver.requests:
        Webhook(client.webhook_secret).verify(request.body, request.headers)
    delivery, attempts = load(engine, delivery_id)
    assert [a.status_code for a in attempts] == [500, 500, 200]
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert attempts[0].response_excerpt == "boom"
    assert "answered 500" in (attempts[0].error or "")
    assert attempts[0].started_at < attempts[1].started_at < attempts[2].started_at
    assert (attempts[1].started_at - attempts[0].started_at).total_seconds() >= 6
    assert (delivery.attempts, delivery.status) == (3, "succeeded")


def test_410_gone_fails_at_once_and_is_not_retried(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    receiver.script("/hook", Reply(410))
    delivery_id = completed_delivery(session, client, settings, receiver.url())
    clock = Clock()

    outcome = attempt_delivery(engine, delivery_id, settings=settings, clock=clock)
    clock.advance(100_000)
    again = attempt_delivery(engine, delivery_id, settings=settings, clock=clock)

    assert outcome.status == "failed"
    assert (again.attempted, again.skipped) == (False, "not_pending")
    assert len(receiver.requests) == 1
    delivery, attempts = load(engine, delivery_id)
    assert delivery.failure_code == "gone"
    assert "410" in (delivery.failure_message or "")
    assert "retry" in (delivery.failure_message or "")
    assert delivery.next_attempt_at is None
    assert delivery.last_status_code == 410
    assert [a.status_code for a in attempts] == [410]


@pytest.mark.parametrize("status", [301, 302, 307])
def test_a_redirect_is_a_failure_and_is_not_followed(
    status: int,
    engine: Engine,
    session: Session,
    settings: Settings,
    client: NewClient,
    receiver: Receiver,
) -> None:
    receiver.script("/hook", Reply(status, headers={"Location": receiver.url("/elsewhere")}))
    delivery_id = completed_delivery(session, client, settings, receiver.url())

    outcome = attempt_delivery(engine, delivery_id, settings=settings)

    assert [r.path for r in receiver.requests] == ["/hook"]
    assert (outcome.status, outcome.status_code) == ("pending", status)
    assert outcome.next_attempt_at is not None  # retried per the schedule
    _, (attempt,) = load(engine, delivery_id)
    assert "not followed" in (attempt.error or "")
    assert "/elsewhere" in (attempt.error or "")


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(
    status: int,
    engine: Engine,
    session: Session,
    settings: Settings,
    client: NewClient,
    receiver: Receiver,
) -> None:
    # The default schedule: attempt 2 comes 5 s after attempt 1, so Retry-After: 7 decides.
    receiver.script("/hook", Reply(status, headers={"Retry-After": "7"}))
    delivery_id = completed_delivery(session, client, settings, receiver.url())

    outcome = attempt_delivery(engine, delivery_id, settings=settings)

    _, (attempt,) = load(engine, delivery_id)
    assert outcome.status == "pending"
    assert outcome.next_attempt_at is not None
    wait = (outcome.next_attempt_at - attempt.started_at).total_seconds()
    assert 7 <= wait <= 14


def test_retry_after_is_honoured_up_to_the_max_retry_after() -> None:
    """No sooner than the receiver asks, up to TRACKER_MAX_RETRY_AFTER (the sender clamps
    a larger one), whatever the scheduled delay."""
    schedule = (0.0, 5.0, 300.0)
    for _ in range(50):
        assert next_retry_delay(schedule, 1, retry_after=7) == 7
        assert next_retry_delay(schedule, 1, retry_after=120) == 120  # not twice 5 s
        assert 4 <= (next_retry_delay(schedule, 1, retry_after=1) or 0) <= 6
        assert 240 <= (next_retry_delay(schedule, 2) or 0) <= 360  # +-20 % jitter
    assert next_retry_delay(schedule, 3) is None  # the schedule is done


@pytest.mark.parametrize(
    ("header", "wait", "note"),
    [
        ("120", 120, None),
        ("31536000", 300, "clamped to 300 s (TRACKER_MAX_RETRY_AFTER)"),
        ("inf", 300, "clamped to 300 s (TRACKER_MAX_RETRY_AFTER)"),
        ("1e400", 300, "clamped to 300 s (TRACKER_MAX_RETRY_AFTER)"),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 300, "clamped to 300 s (TRACKER_MAX_RETRY_AFTER)"),
        ("nan", None, "ignored: the retry schedule decides"),
        ("-5", None, "ignored: the retry schedule decides"),
    ],
)
def test_a_receivers_retry_after_is_honoured_up_to_the_max_and_a_clamp_is_logged(
    engine: Engine,
    session: Session,
    settings: Settings,
    client: NewClient,
    receiver: Receiver,
    header: str,
    wait: float | None,
    note: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.script("/hook", Reply(429, headers={"Retry-After": header}))
    delivery_id = completed_delivery(session, client, settings, receiver.url())

    with caplog.at_level(logging.WARNING, logger="tracker.delivery"):
        outcome = attempt_delivery(engine, delivery_id, settings=settings)

    _, (attempt,) = load(engine, delivery_id)
    assert outcome.next_attempt_at is not None
    waited = (outcome.next_attempt_at - attempt.started_at).total_seconds()
    if wait is None:
        assert 4 <= waited <= 6.1  # the schedule's 5 s, +-20 %
    else:
        assert wait <= waited <= wait + 1
    if note is None:
        assert "Retry-After" not in (attempt.error or "")
    else:
        assert note in (attempt.error or "")
        assert any(note in r.getMessage() for r in caplog.records)


def test_a_receiver_that_never_answers_times_out_without_blocking_another_delivery(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    settings = tune(settings, webhook_timeout=1.0)
    receiver.script("/slow", Reply(delay=30))
    slow_id = completed_delivery(session, client, settings, receiver.url("/slow"), task_id="slow")
    fast_id = completed_delivery(session, client, settings, receiver.url("/fast"), task_id="fast")
    finished: dict[str, float] = {}
    start = time.monotonic()

    def attempt(delivery_id: str, pause: float) -> DeliveryOutcome:
        time.sleep(pause)
        outcome = attempt_delivery(engine, delivery_id, settings=settings)
        finished[delivery_id] = time.monotonic() - start
        return outcome

    slow, fast = run_in_threads(lambda: attempt(slow_id, 0), lambda: attempt(fast_id, 0.2))

    assert fast.status == "succeeded"
    assert finished[fast_id] < 0.9  # done while the slow receiver was still silent
    assert 0.9 <= finished[slow_id] < 2.5
    assert slow.status == "pending"
    assert slow.status_code is None
    assert "within 1 s" in (slow.error or "")
    _, (attempt_row,) = load(engine, slow_id)
    assert 900 <= attempt_row.duration_ms < 2500


def test_a_receiver_dripping_its_answer_is_cut_off_at_the_timeout(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """Socket timeouts apply per read; the attempt's deadline bounds the whole exchange."""
    settings = tune(settings, webhook_timeout=1.0)
    receiver.script("/hook", Reply(drip=0.2))
    delivery_id = completed_delivery(session, client, settings, receiver.url())
    start = time.monotonic()

    outcome = attempt_delivery(engine, delivery_id, settings=settings)

    assert time.monotonic() - start < 2.0
    assert outcome.status == "pending"
    assert "within 1 s" in (outcome.error or "")


def test_connection_refused_is_retried_with_a_message_saying_so(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    url = receiver.url()
    receiver.close()  # nobody listens on that port any more
    delivery_id = completed_delivery(session, client, settings, url)

    outcome = attempt_delivery(engine, delivery_id, settings=settings)

    assert outcome.status == "pending"
    assert outcome.next_attempt_at is not None
    assert "could not connect to 127.0.0.1" in (outcome.error or "")


def test_after_the_last_scheduled_attempt_the_delivery_fails_with_the_last_error(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    settings = tune(settings, webhook_retry_schedule=(0.0, 0.0))
    receiver.script("/hook", Reply(500), Reply(502))
    delivery_id = completed_delivery(session, client, settings, receiver.url())

    attempt_delivery(engine, delivery_id, settings=settings)
    outcome = attempt_delivery(engine, delivery_id, settings=settings)

    assert outcome.status == "failed"
    delivery, _ = load(engine, delivery_id)
    assert delivery.failure_code == "retries_exhausted"
    assert "2 attempts" in (delivery.failure_message or "")
    assert "answered 502" in (delivery.failure_message or "")
    assert "tracker deliveries retry" in (delivery.failure_message or "")


def test_only_the_first_2_kib_of_the_answer_is_kept(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    receiver.script("/hook", Reply(500, body="é".encode() + b"x" * 10_000))
    delivery_id = completed_delivery(session, client, settings, receiver.url())

    attempt_delivery(engine, delivery_id, settings=settings)

    _, (attempt,) = load(engine, delivery_id)
    assert attempt.response_excerpt is not None
    assert attempt.response_excerpt.startswith("éxxx")
    assert len(attempt.response_excerpt.encode()) == 2048


def test_during_a_rotation_old_and_new_secrets_both_verify(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    new_secret = rotate_secret(session, client.client, grace_seconds=3600)
    session.commit()
    delivery_id = completed_delivery(session, client, settings, receiver.url())

    attempt_delivery(engine, delivery_id, settings=settings)

    (request,) = receiver.requests
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    for secret in (client.webhook_secret, new_secret):  # two receivers, one secret each
        Webhook(secret).verify(request.body, request.headers)


def test_after_the_grace_period_only_the_new_secret_signs(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    new_secret = rotate_secret(
        session, client.client, grace_seconds=60, now=utcnow() - timedelta(seconds=120)
    )
    session.commit()
    delivery_id = completed_delivery(session, client, settings, receiver.url())

    attempt_delivery(engine, delivery_id, settings=settings)

    (request,) = receiver.requests
    assert len(request.headers["webhook-signature"].split(" ")) == 1
    Webhook(new_secret).verify(request.body, request.headers)


def _private_resolver(host: str, port: int) -> list[str]:
    answers = {
        "internal.example.test": ["192.168.1.20"],
        "mixed.example.test": ["93.184.216.34", "10.9.9.9"],
    }
    return answers[host]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/hook",
        "http://localhost:{port}/hook",  # resolved by the system resolver
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/hook",
        "http://[fd00::1]/hook",
        "http://[::ffff:127.0.0.1]:{port}/hook",
        "http://100.64.0.1/hook",
        "http://internal.example.test/hook",
        "http://mixed.example.test/hook",
    ],
)
def test_non_public_callbacks_are_refused_at_once_and_not_retried(
    url: str,
    engine: Engine,
    session: Session,
    settings: Settings,
    client: NewClient,
    receiver: Receiver,
) -> None:
    settings = tune(settings, webhook_allow_private=False)
    url = url.format(port=receiver.port)
    delivery_id = completed_delivery(session, client, settings, url)
    resolver = None if "localhost" in url else _private_resolver

    outcome = attempt_delivery(engine, delivery_id, settings=settings, resolver=resolver)

    assert receiver.requests == []
    assert outcome.status == "failed"
    delivery, (attempt,) = load(engine, delivery_id)
    assert delivery.failure_code == "forbidden_address"
    assert "TRACKER_WEBHOOK_ALLOW_PRIVATE" in (delivery.failure_message or "")
    assert delivery.next_attempt_at is None
    assert attempt.status_code is None
    assert "address" in (attempt.error or "")


def test_the_request_goes_to_the_vetted_address_with_the_original_host_header(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """A resolver that would answer differently the second time (DNS rebinding) is asked once."""
    answers = iter([["127.0.0.1"], ["10.255.255.1"]])
    asked: list[str] = []

    def rebinding_resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    url = f"http://hooks.example.test:{receiver.port}/hook?source=tracker"
    delivery_id = completed_delivery(session, client, settings, url)

    outcome = attempt_delivery(engine, delivery_id, settings=settings, resolver=rebinding_resolver)

    assert outcome.status == "succeeded"
    assert asked == ["hooks.example.test"]
    (request,) = receiver.requests
    assert request.headers["host"] == f"hooks.example.test:{receiver.port}"
    assert request.path == "/hook?source=tracker"


def test_an_unreachable_first_address_falls_back_to_the_next_vetted_one(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """`localhost` often answers ::1 first; a receiver listening on IPv4 only still gets it."""
    url = f"http://dual.example.test:{receiver.port}/hook"
    delivery_id = completed_delivery(session, client, settings, url)

    outcome = attempt_delivery(
        engine, delivery_id, settings=settings, resolver=lambda host, port: ["::1", "127.0.0.1"]
    )

    assert outcome.status == "succeeded"
    assert len(receiver.requests) == 1


def _self_signed_certificate(directory: Path, hostname: str) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname}"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_to_the_vetted_address_checks_the_certificate_against_the_host_name(
    tmp_path: Path, engine: Engine, session: Session, settings: Settings, client: NewClient
) -> None:
    cert, key = _self_signed_certificate(tmp_path, "hooks.example.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tls_receiver = Receiver(tls=context)
    http = new_http_session()
    http.verify = str(cert)  # trust the test certificate, and nothing else
    to_loopback = lambda host, port: ["127.0.0.1"]  # noqa: E731
    try:
        good = completed_delivery(
            session, client, settings, tls_receiver.url(host="hooks.example.test"), task_id="good"
        )
        wrong = completed_delivery(
            session, client, settings, tls_receiver.url(host="other.example.test"), task_id="bad"
        )

        sent = attempt_delivery(engine, good, settings=settings, http=http, resolver=to_loopback)
        refused = attempt_delivery(
            engine, wrong, settings=settings, http=http, resolver=to_loopback
        )

        assert sent.status == "succeeded"
        (request,) = tls_receiver.requests
        assert request.headers["host"] == f"hooks.example.test:{tls_receiver.port}"
        assert refused.status == "pending"
        assert "TLS failed" in (refused.error or "")
    finally:
        http.close()
        tls_receiver.close()


def test_a_claim_is_exclusive_until_its_lease_expires(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    delivery_id = completed_delivery(session, client, settings, receiver.url())
    now = utcnow()
    with Session(engine) as first, first.begin():
        assert claim_delivery(first, delivery_id, now=now, lease_seconds=30) is not None
    with Session(engine) as second, second.begin():
        assert claim_delivery(second, delivery_id, now=now, lease_seconds=30) is None
        later = now + timedelta(seconds=31)
        assert claim_delivery(second, delivery_id, now=later, lease_seconds=30) is not None


def test_postgresql_claims_skip_a_row_locked_by_another_claim(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """Two claims in flight at once: the second skips the locked row instead of waiting."""
    if engine.dialect.name != "postgresql":
        # SQLite has one writer at a time (BEGIN IMMEDIATE): the second claim would queue
        # behind the first and then see its lease, which the test above covers.
        return
    delivery_id = completed_delivery(session, client, settings, receiver.url())
    now = utcnow()
    with Session(engine) as first, first.begin():
        assert claim_delivery(first, delivery_id, now=now, lease_seconds=30) is not None
        with Session(engine) as second, second.begin():
            assert claim_delivery(second, delivery_id, now=now, lease_seconds=30) is None


def test_duplicate_jobs_for_one_delivery_send_it_once(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    receiver.script("/hook", Reply(delay=0.3))
    delivery_id = completed_delivery(session, client, settings, receiver.url())

    outcomes = run_in_threads(
        lambda: attempt_delivery(engine, delivery_id, settings=settings),
        lambda: attempt_delivery(engine, delivery_id, settings=settings),
    )

    assert len(receiver.requests) == 1
    assert sorted(o.attempted for o in outcomes) == [False, True]
    assert {o.skipped for o in outcomes} == {None, "claimed"}
    delivery, attempts = load(engine, delivery_id)
    assert (delivery.status, len(attempts)) == ("succeeded", 1)


def test_a_superseded_delivery_is_not_sent(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    task = new_task(
        session, client, settings, receiver.url(), events=["task.running", "task.completed"]
    )
    running = transition(session, task, "running")
    completed = transition(session, task, "completed")
    assert running is not None
    assert completed is not None

    skipped = attempt_delivery(engine, running.id, settings=settings)
    sent = attempt_delivery(engine, completed.id, settings=settings)

    assert (skipped.attempted, skipped.skipped, skipped.status) == (
        False,
        "not_pending",
        "superseded",
    )
    assert sent.status == "succeeded"
    assert [r.headers["webhook-id"] for r in receiver.requests] == [completed.id]


def test_a_newer_event_waits_while_an_older_one_is_in_flight(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """`task.running` is being sent when the task completes: it is superseded mid-flight,
    its attempt is only logged, and `task.completed` goes out only after it."""
    receiver.script("/hook", Reply(delay=0.5))
    task = new_task(
        session, client, settings, receiver.url(), events=["task.running", "task.completed"]
    )
    running = transition(session, task, "running")
    assert running is not None
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(attempt_delivery, engine, running.id, settings=settings)
        receiver.wait_for(1)
        completed = transition(session, task, "completed")
        assert completed is not None
        waiting = attempt_delivery(engine, completed.id, settings=settings)
        first = in_flight.result(timeout=10)
    sent = attempt_delivery(engine, completed.id, settings=settings)

    assert (waiting.attempted, waiting.skipped) == (False, "waiting_for_older")
    assert (first.attempted, first.status, first.status_code) == (True, "superseded", 200)
    assert first.follow_up_ids == (completed.id,)  # the job rings for it at once
    assert sent.status == "succeeded"
    assert [r.headers["webhook-id"] for r in receiver.requests] == [running.id, completed.id]
    delivery, attempts = load(engine, running.id)
    assert (delivery.status, delivery.claimed_until, len(attempts)) == ("superseded", None, 1)
    assert delivery.delivered_at is None  # logged only, not settled


def test_an_older_pending_event_is_claimed_before_a_newer_one(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    task = new_task(
        session, client, settings, receiver.url(), events=["task.running", "task.completed"]
    )
    running = transition(session, task, "running")
    completed = transition(session, task, "completed")
    assert running is not None
    assert completed is not None
    # Not reachable through record_transition (it supersedes the older event): the claim's
    # order rule must hold on its own, whatever else touched the rows.
    running.status, running.next_attempt_at = "pending", utcnow()
    session.commit()

    assert attempt_delivery(engine, completed.id, settings=settings).skipped == "waiting_for_older"
    assert attempt_delivery(engine, running.id, settings=settings).status == "succeeded"
    assert attempt_delivery(engine, completed.id, settings=settings).status == "succeeded"
    assert [r.headers["webhook-id"] for r in receiver.requests] == [running.id, completed.id]


def test_redelivering_a_failed_delivery_appends_attempts_under_the_same_id(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    receiver.script("/hook", Reply(410))
    delivery_id = completed_delivery(session, client, settings, receiver.url())
    assert attempt_delivery(engine, delivery_id, settings=settings).status == "failed"

    with Session(engine) as manual, manual.begin():
        reset = redeliver(manual, delivery_id, client_id=client.client.id, now=utcnow())
        assert (reset.status, reset.failure_code, reset.claimed_until) == ("pending", None, None)
    outcome = attempt_delivery(engine, delivery_id, settings=settings)

    assert (outcome.status, outcome.attempt) == ("succeeded", 2)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [delivery_id] * 2
    delivery, attempts = load(engine, delivery_id)
    assert [a.status_code for a in attempts] == [410, 200]
    assert delivery.failure is None
    assert delivery.last_status_code == 200


def test_a_manual_retry_after_the_schedule_is_exhausted_gets_one_more_attempt(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    settings = tune(settings, webhook_retry_schedule=(0.0, 0.0))
    receiver.script("/hook", Reply(500), Reply(500), Reply(500))
    delivery_id = completed_delivery(session, client, settings, receiver.url())
    attempt_delivery(engine, delivery_id, settings=settings)
    attempt_delivery(engine, delivery_id, settings=settings)

    with Session(engine) as manual, manual.begin():
        redeliver(manual, delivery_id, now=utcnow())
    outcome = attempt_delivery(engine, delivery_id, settings=settings)

    assert (outcome.status, outcome.attempt) == ("failed", 3)
    delivery, _ = load(engine, delivery_id)
    assert delivery.failure_code == "retries_exhausted"


def test_redeliver_refuses_unknown_foreign_and_superseded_deliveries(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    task = new_task(
        session, client, settings, receiver.url(), events=["task.running", "task.completed"]
    )
    running = transition(session, task, "running")
    completed = transition(session, task, "completed")
    assert running is not None
    assert completed is not None
    other = create_client(session, "other")
    session.commit()

    with pytest.raises(DeliveryNotFound):
        redeliver(session, "msg_missing", now=utcnow())
    with pytest.raises(DeliveryNotFound):
        redeliver(session, completed.id, client_id=other.client.id, now=utcnow())
    with pytest.raises(Conflict, match="superseded") as caught:
        redeliver(session, running.id, now=utcnow())
    assert caught.value.code == "delivery_superseded"


def test_due_delivery_ids_lists_pending_due_unleased_rows_oldest_first(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    first = completed_delivery(session, client, settings, receiver.url(), task_id="a")
    second = completed_delivery(session, client, settings, receiver.url(), task_id="b")
    leased = completed_delivery(session, client, settings, receiver.url(), task_id="c")
    done = completed_delivery(session, client, settings, receiver.url(), task_id="d")
    attempt_delivery(engine, done, settings=settings)
    now = utcnow()
    with Session(engine) as claiming, claiming.begin():
        claim_delivery(claiming, leased, now=now, lease_seconds=30)

    with Session(engine) as reading:
        assert due_delivery_ids(reading, now=now, limit=10) == [first, second]
        assert due_delivery_ids(reading, now=now, limit=1) == [first]
        assert set(due_delivery_ids(reading, now=now + timedelta(seconds=31), limit=10)) == {
            first,
            second,
            leased,
        }


def test_redeliver_refuses_an_older_event_once_a_newer_one_exists(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    settings = tune(settings, webhook_retry_schedule=(0.0,))
    receiver.script("/hook", Reply(500))
    task = new_task(
        session, client, settings, receiver.url(), events=["task.running", "task.completed"]
    )
    running = transition(session, task, "running")
    assert running is not None
    assert attempt_delivery(engine, running.id, settings=settings).status == "failed"
    completed = transition(session, task, "completed")
    assert completed is not None

    with pytest.raises(Conflict, match=completed.id) as caught:
        redeliver(session, running.id, now=utcnow())
    assert caught.value.code == "delivery_outdated"
    redeliver(session, completed.id, now=utcnow())  # the newest event may always be resent


def test_a_batch_is_claimed_sent_and_recorded_per_delivery(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """Each delivery of a batch gets its own outcome, attempt row and schedule."""
    clock = Clock()
    receiver.script("/retry", Reply(500))
    receiver.script("/gone", Reply(410))
    ok = completed_delivery(session, client, settings, receiver.url("/ok"), task_id="ok")
    also_ok = completed_delivery(session, client, settings, receiver.url("/ok"), task_id="ok2")
    retry = completed_delivery(session, client, settings, receiver.url("/retry"), task_id="r")
    gone = completed_delivery(session, client, settings, receiver.url("/gone"), task_id="g")
    ids = [ok, "msg_missing", retry, gone, also_ok, ok]

    outcomes = attempt_deliveries(engine, ids, settings=settings, clock=clock)

    assert [o.delivery_id for o in outcomes] == [ok, "msg_missing", retry, gone, also_ok]
    assert [o.status for o in outcomes] == ["succeeded", None, "pending", "failed", "succeeded"]
    assert outcomes[1].skipped == "not_found"
    assert sorted(r.headers["webhook-id"] for r in receiver.requests) == sorted(
        [ok, retry, gone, also_ok]
    )
    for delivery_id in (ok, also_ok):
        delivery, attempts = load(engine, delivery_id)
        assert (delivery.status, delivery.attempts, delivery.last_status_code) == (
            "succeeded",
            1,
            200,
        )
        assert (delivery.claimed_until, delivery.next_attempt_at) == (None, None)
        assert [(a.attempt, a.status_code) for a in attempts] == [(1, 200)]
    delivery, attempts = load(engine, retry)
    assert (delivery.status, delivery.attempts, delivery.claimed_until) == ("pending", 1, None)
    assert delivery.next_attempt_at is not None
    assert 4 <= (delivery.next_attempt_at - clock()).total_seconds() <= 6
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 500)]
    delivery, attempts = load(engine, gone)
    assert (delivery.status, delivery.failure_code, delivery.attempts) == ("failed", "gone", 1)
    assert [(a.attempt, a.status_code) for a in attempts] == [(1, 410)]

    clock.advance(10)
    again = attempt_deliveries(engine, [ok, retry, gone], settings=settings, clock=clock)

    assert [(o.attempted, o.skipped, o.status) for o in again] == [
        (False, "not_pending", "succeeded"),
        (True, None, "succeeded"),
        (False, "not_pending", "failed"),
    ]
    delivery, attempts = load(engine, retry)
    assert (delivery.attempts, [a.status_code for a in attempts]) == (2, [500, 200])


def test_two_events_of_one_task_in_one_batch_go_out_oldest_first(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    task = new_task(
        session, client, settings, receiver.url(), events=["task.running", "task.completed"]
    )
    running = transition(session, task, "running")
    completed = transition(session, task, "completed")
    assert running is not None
    assert completed is not None
    running.status, running.next_attempt_at = "pending", utcnow()  # as in the test above
    session.commit()

    first, newer = attempt_deliveries(engine, [completed.id, running.id], settings=settings)
    later = attempt_delivery(engine, completed.id, settings=settings)

    assert (first.delivery_id, first.skipped) == (completed.id, "waiting_for_older")
    assert (newer.delivery_id, newer.status) == (running.id, "succeeded")
    assert newer.follow_up_ids == (completed.id,)  # the job rings for it at once
    assert later.status == "succeeded"
    assert [r.headers["webhook-id"] for r in receiver.requests] == [running.id, completed.id]


def test_a_batch_is_sent_at_once_and_a_slow_receiver_does_not_hold_back_the_record(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    receiver.script("/hook", Reply(delay=0.6), Reply(delay=0.6), Reply(delay=0.6))
    receiver.script("/slow", Reply(delay=2.5))
    ids = [
        completed_delivery(session, client, settings, receiver.url(), task_id=f"t{n}")
        for n in range(3)
    ]
    slow = completed_delivery(session, client, settings, receiver.url("/slow"), task_id="slow")
    start = time.monotonic()

    with ThreadPoolExecutor(1) as pool:
        batch = pool.submit(attempt_deliveries, engine, [*ids, slow], settings=settings)
        time.sleep(1.6)
        # The three 0.6 s answers came together, and were recorded before the slow one.
        recorded = [load(engine, delivery_id)[0].status for delivery_id in ids]
        in_flight = load(engine, slow)[0]
        outcomes = batch.result(timeout=10)

    assert recorded == ["succeeded"] * 3
    assert (in_flight.status, in_flight.attempts) == ("pending", 0)
    assert in_flight.claimed_until is not None
    assert [o.status for o in outcomes] == ["succeeded"] * 4
    assert 2.4 <= time.monotonic() - start < 4.5
    starts = sorted(r.at for r in receiver.requests)
    assert starts[-1] - starts[0] < 0.5  # not one after another


def test_2xx_answers_to_rows_still_ours_are_recorded_in_one_statement(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """An answer read but not yet recorded is sent again if the worker dies: on PostgreSQL
    the 2xx answers of a batch are recorded in one autocommitted statement (status and
    attempt row together), before and apart from the transaction the others need."""
    receiver.script("/retry", Reply(500))
    ok = [
        completed_delivery(session, client, settings, receiver.url("/ok"), task_id=f"ok{n}")
        for n in range(3)
    ]
    retry = completed_delivery(session, client, settings, receiver.url("/retry"), task_id="r")
    statements: list[str] = []

    def remember(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    engines = [engine, *filter(None, [autocommit_engine(engine)])]
    for each in engines:
        event.listen(each, "before_cursor_execute", remember)
    try:
        outcomes = attempt_deliveries(engine, [*ok, retry], settings=settings)
    finally:
        for each in engines:
            event.remove(each, "before_cursor_execute", remember)

    assert [o.status for o in outcomes] == ["succeeded"] * 3 + ["pending"]
    logging_attempts = [s for s in statements if "INSERT INTO webhook_attempts" in s]
    settling = [s for s in logging_attempts if "WITH answer AS" in s]
    if engine.dialect.name == "postgresql":
        # One statement per group of answers recorded (they come in as they come); only
        # the 500 goes through the transaction of `record_attempts`.
        assert settling
        assert len(logging_attempts) - len(settling) == 1
    else:
        assert not settling
    for delivery_id in ok:
        delivery, attempts = load(engine, delivery_id)
        assert (delivery.status, delivery.attempts, delivery.claimed_until) == (
            "succeeded",
            1,
            None,
        )
        assert delivery.delivered_at is not None
        assert [(a.attempt, a.status_code, a.error) for a in attempts] == [(1, 200, None)]
    delivery, attempts = load(engine, retry)
    assert (delivery.status, [a.status_code for a in attempts]) == ("pending", [500])


def test_the_thread_that_reads_a_2xx_answer_records_it_with_those_that_came_meanwhile(
    engine: Engine, session: Session, settings: Settings, client: NewClient, receiver: Receiver
) -> None:
    """A worker killed between reading an acknowledgement and recording it makes a duplicate:
    on PostgreSQL the sending thread records its 2xx answer itself, at once; while a
    statement of the batch is in flight it hands the answer over and goes on, and the
    thread in flight records every answer handed over in one more statement."""
    if engine.dialect.name != "postgresql":
        return  # SQLite: the job's thread records every answer, in one transaction
    ids = [
        completed_delivery(session, client, settings, receiver.url(), task_id=f"t{n}")
        for n in range(3)
    ]
    with Session(engine) as claiming, claiming.begin():
        first, second, third = claim_deliveries(claiming, ids, now=utcnow(), lease_seconds=30)
    answer = WebhookAnswer(utcnow(), duration_ms=5, status_code=200, excerpt="ok")
    autocommit = autocommit_engine(engine)
    assert autocommit is not None
    recorded_ids: list[list[str]] = []

    def remember(conn: object, cursor: object, statement: str, parameters: Any, *_: object) -> None:
        if "WITH answer AS" in statement:
            recorded_ids.append(parameters["id"])

    settler = Settler(autocommit, utcnow)
    event.listen(autocommit, "before_cursor_execute", remember)
    try:
        with Session(engine) as holder, holder.begin():
            holder.execute(
                select(WebhookDelivery.id).where(WebhookDelivery.id == first.id).with_for_update()
            )
            in_flight = threading.Thread(target=settler.settle, args=(first, answer))
            in_flight.start()
            wait_until(
                lambda: _waiting_for_a_lock(engine), timeout=10, interval=0.02, what="a lock wait"
            )
            settler.settle(second, answer)  # returns at once: handed over
            settler.settle(third, answer)
            assert load(engine, second.id)[0].status == "pending"
        in_flight.join(timeout=10)
    finally:
        event.remove(autocommit, "before_cursor_execute", remember)

    assert not in_flight.is_alive()
    assert recorded_ids == [[first.id], [second.id, third.id]]
    for claim in (first, second, third):
        outcome = settler.recorded(claim.id)
        assert outcome is not None
        assert outcome[0].status == "succeeded"
        delivery, attempts = load(engine, claim.id)
        assert (delivery.status, [a.status_code for a in attempts]) == ("succeeded", [200])


def _waiting_for_a_lock(engine: Engine) -> bool:
    with engine.connect() as connection:
        return bool(
            connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )
        )


def test_both_ways_of_recording_a_2xx_write_the_same_rows(pg_url: str, receiver: Receiver) -> None:
    """The 2xx rule is written twice, for speed: in Python (`record_attempts`) and in the
    single PostgreSQL statement of `settle_acknowledged`. Both must leave the same rows."""
    from tracker.config import load_settings
    from tracker.db.engine import make_engine
    from tracker.delivery.outcome import record_attempts, settle_acknowledged

    engine = make_engine(pg_url)
    settings = load_settings(database_url=pg_url, webhook_allow_private=True, _env_file=None)
    with Session(engine, expire_on_commit=False) as session:
        client = create_client(session, "agree")
        session.commit()
        ids = [
            completed_delivery(session, client, settings, receiver.url(), task_id=f"a{n}")
            for n in range(2)
        ]
    now = utcnow()
    with Session(engine) as claiming, claiming.begin():
        by_python, by_sql = claim_deliveries(claiming, ids, now=now, lease_seconds=30)
    answer = WebhookAnswer(now, duration_ms=7, status_code=204, excerpt="")
    with Session(engine) as session, session.begin():
        record_attempts(session, [(by_python, answer)], settings=settings, now=now)
    autocommit = autocommit_engine(engine)
    assert autocommit is not None
    with autocommit.connect() as connection:
        settled = settle_acknowledged(connection, [(by_sql, answer)], now=now)
    assert [row.id for row, _, _ in settled] == [by_sql.id]

    def written(delivery_id: str) -> tuple[object, ...]:
        delivery, attempts = load(engine, delivery_id)
        return (
            delivery.status,
            delivery.attempts,
            delivery.claimed_until,
            delivery.next_attempt_at,
            delivery.delivered_at,
            delivery.last_status_code,
            delivery.failure_code,
            delivery.failure_message,
            [
                (a.attempt, a.started_at, a.duration_ms, a.status_code, a.response_excerpt, a.error)
                for a in attempts
            ],
        )

    assert written(by_sql.id) == written(by_python.id)
    assert written(by_python.id)[:2] == ("succeeded", 1)
    engine.dispose()
