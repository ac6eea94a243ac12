"""Webhook delivery: claim a batch of outbox rows, send one attempt each, schedule the next.

One call of `attempt_deliveries` (a `deliver` job) is three steps, so no
database transaction is open while a receiver is slow:

1. a short transaction claims the due rows of the batch with a lease, in one
   statement, and reads their payloads, URLs and the clients' secrets in force
   (`tracker.delivery.outbox`);
2. outside any transaction, the process's sending threads each resolve and vet
   a callback host (`tracker.delivery.netguard`) and POST the stored payload to the
   vetted address, all requests of the batch at once (`tracker.delivery.sender`);
3. the answers are recorded as they come in: on PostgreSQL, a 2xx answer to a row
   still ours by the sending thread that read it, with any others waiting, in one
   autocommitted statement (`Settler`, `settle_acknowledged`); the others by the
   job's thread, in a short transaction that applies the outcome rules to the rows
   still ours; a row that changed meanwhile (superseded, retried by hand, lease taken
   over) only gets its attempt logged (`tracker.delivery.outcome`).

The retry schedule lives on the row (`next_attempt_at`), never in broker
countdowns. Nothing here knows about Celery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from datetime import datetime
from functools import partial
from typing import Any

import requests
from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.engine import autocommit_engine, retry_while_unreachable, transaction
from tracker.db.models import WebhookDelivery
from tracker.delivery.netguard import Resolver
from tracker.delivery.outbox import (
    Claim,
    among_ids,
    claim_batch,
    claim_next_due,
    hand_over_slots,
    next_due_ids,
    older_event_unsettled,
)
from tracker.delivery.outcome import (
    Acknowledged,
    DeliveryOutcome,
    record_attempts,
    settle_acknowledged,
)
from tracker.delivery.sender import WebhookAnswer, send_pool, send_webhook
from tracker.states import DELIVERY_PENDING
from tracker.tracking.clients import secrets_in_force

Sessions = Engine | sessionmaker[Session]

log = logging.getLogger("tracker.delivery")


def attempt_delivery(
    sessions: Sessions,
    delivery_id: str,
    *,
    settings: Settings,
    http: requests.Session | None = None,
    resolver: Resolver | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> DeliveryOutcome:
    """One attempt of one due delivery: `attempt_deliveries` of a single id."""
    outcome, *_ = attempt_deliveries(
        sessions, [delivery_id], settings=settings, http=http, resolver=resolver, clock=clock
    )
    return outcome


def attempt_deliveries(
    sessions: Sessions,
    delivery_ids: Iterable[str],
    *,
    settings: Settings,
    http: requests.Session | None = None,
    resolver: Resolver | None = None,
    clock: Callable[[], datetime] = utcnow,
    pump: bool = False,
    hand_off_after: float | None = None,
    on_outcomes: Callable[[list[DeliveryOutcome]], None] | None = None,
) -> list[DeliveryOutcome]:
    """One attempt of each due delivery of a batch; an outcome per id, in order.

    A short transaction claims the batch (within what each destination allows) and
    reads the payloads and the clients' secrets; the requests then go out at once from
    the process's sending threads (`tracker.delivery.sender.send_pool`), outside any
    transaction; the answers are recorded as they come in (a 2xx by the thread that
    read it, on PostgreSQL), so neither a slow receiver nor a dying worker holds back
    the record of the others. Safe to call twice for the same ids at once (a
    duplicated job): the lease lets one call send, the other returns `attempted=False`.

    `pump`: as its answers free a destination's slots, the call takes that
    destination's next due deliveries itself (`claim_next_due`), for up to
    `PUMP_SECONDS`, so a destination with a backlog keeps its attempts in flight
    without a round through the broker; their outcomes follow the batch's.
    `hand_off_after`: once no answer has come for that many seconds and nothing is
    left to take, the call returns; the attempts still in flight (a slow receiver)
    record themselves from their sending threads and report to `on_outcomes`, so a
    slow destination holds no job thread.
    """
    ids = list(dict.fromkeys(delivery_ids))
    job = _Job(sessions, settings, http, resolver, clock, on_outcomes)
    with transaction(sessions) as session:
        now = clock()
        claimed = claim_batch(
            session,
            ids,
            now=now,
            lease_seconds=settings.webhook_lease,
            concurrency=settings.destination_concurrency,
            probe_seconds=settings.destination_probe,
        )
        claimed_ids = {claim.id for claim in claimed.claims}
        job.outcomes.update(
            (outcome.delivery_id, outcome)
            for outcome in _not_claimed(
                session, [i for i in ids if i not in claimed_ids], now, claimed.held
            )
        )
        job.read_secrets(session, claimed.claims, now)
    job.submit(claimed.claims)
    contended = set(claimed.contended) if pump else set()
    pump_until = time.monotonic() + PUMP_SECONDS
    if pump:
        job.start_handing_over()
    pumped: set[tuple[int, str]] = set()
    looks = 0
    while job.in_flight() or contended:
        if job.waiting:
            if not job.collect(timeout=hand_off_after):  # only slow answers are left:
                job.stop_handing_over()
                job.hand_off(ring_next=pump)  # they record themselves
                break
        elif looks < CONTENDED_LOOKS:  # another claim was counting these: look again
            looks += 1
            time.sleep(CONTENDED_PAUSE)
        else:
            break
        pumping = pump and time.monotonic() < pump_until
        if pumping:
            # The slots just freed go to each destination's next due deliveries, whoever
            # leased them: a job that found a destination full left them to this one.
            # Those of 2xx answers were handed over by their sending threads already
            # (PostgreSQL); the others' are free once this thread records them.
            pumped |= job.answered_keys
            contended = job.take_next(job.freed | contended)
        failed = job.record_collected()
        if pumping and failed:
            contended |= job.take_next(failed)
        elif not pumping:
            job.stop_handing_over()  # what it hands over is still sent and collected
            contended = set()
    if pump and time.monotonic() >= pump_until:
        job.ring_backlog(pumped)
    job.raise_unsent()
    extra = [o for key, o in job.outcomes.items() if key not in set(ids)]
    return [job.outcomes[delivery_id] for delivery_id in ids] + extra


# How long a pumping job keeps taking its destinations' next deliveries (then it rings
# them for other jobs), and how often and how long it looks again at a destination whose
# lock another claim held (a claim holds it for one short transaction).
PUMP_SECONDS = 10.0
CONTENDED_PAUSE = 0.01
CONTENDED_LOOKS = 3


class _Job:
    """One `attempt_deliveries` call: its claims in flight, their answers, their outcomes."""

    def __init__(
        self,
        sessions: Sessions,
        settings: Settings,
        http: requests.Session | None,
        resolver: Resolver | None,
        clock: Callable[[], datetime],
        on_outcomes: Callable[[list[DeliveryOutcome]], None] | None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.clock = clock
        self.on_outcomes = on_outcomes
        self.outcomes: dict[str, DeliveryOutcome] = {}
        self.secrets: dict[int, list[str]] = {}
        self.sending: dict[Future[WebhookAnswer], Claim] = {}
        self.waiting: set[Future[WebhookAnswer]] = set()
        # Sent by a sending thread handing its slot over, not yet among `waiting`.
        self.submitted: set[Future[WebhookAnswer]] = set()
        self.submitted_lock = threading.Lock()
        # Answers collected, not recorded yet, and the destinations whose slots they freed.
        self.answered: list[tuple[Claim, WebhookAnswer]] = []
        self.settled: list[Acknowledged] = []
        self.freed: set[tuple[int, str]] = set()
        self.answered_keys: set[tuple[int, str]] = set()
        self.unsent: BaseException | None = None
        self.lease_ends = time.monotonic() + settings.webhook_lease
        autocommit = autocommit_engine(sessions)
        self.settler = None if autocommit is None else Settler(autocommit, clock)
        self.pool = send_pool()
        self.send = partial(
            _send_and_settle,
            settler=self.settler,
            timeout=settings.webhook_timeout,
            allow_private=settings.webhook_allow_private,
            max_retry_after=settings.max_retry_after,
            http=http,
            resolver=resolver,
            clock=clock,
        )

    def read_secrets(self, session: Session, claims: Sequence[Claim], now: datetime) -> None:
        wanted = {claim.client_id for claim in claims} - set(self.secrets)
        self.secrets.update(secrets_in_force(session, wanted, now=now))

    def submit(self, claims: Sequence[Claim]) -> None:
        """Send these claims; from the job's thread, or a sending thread handing over."""
        for claim in claims:
            # Until answered, a claim's outcome says it is in flight.
            self.outcomes[claim.id] = DeliveryOutcome(claim.id, attempted=True)
            future = self.pool.submit(self.send, claim, self.secrets.get(claim.client_id, ()))
            with self.submitted_lock:
                self.sending[future] = claim
                self.submitted.add(future)

    def in_flight(self) -> bool:
        """Whether attempts are in flight, those submitted meanwhile counted."""
        with self.submitted_lock:
            self.waiting |= self.submitted
            self.submitted = set()
        return bool(self.waiting)

    def collect(self, *, timeout: float | None) -> bool:
        """Take every answer in so far (the 2xx ones recorded by their sending threads
        already: their destinations are in `freed`); False if none came within `timeout`.
        `record_collected` records the others and logs them all."""
        self.in_flight()
        done, self.waiting = wait(self.waiting, timeout=timeout, return_when=FIRST_COMPLETED)
        if not done:
            return False
        self.freed = set()
        self.answered_keys = {self.sending[future].destination_key for future in done}
        for future in done:
            error = future.exception()
            if error is not None:  # a bug, not a receiver's answer: its lease expires, tried again
                self.unsent = self.unsent or error
                continue
            claim, answer = self.sending[future], future.result()
            acknowledged = None
            if self.settler is not None and answer.succeeded and not claim.probe:
                acknowledged = self.settler.recorded(claim.id)
            if acknowledged is None:
                self.answered.append((claim, answer))
            else:
                self.settled.append(acknowledged)
                self.freed.add(claim.destination_key)
        if self.settler is not None and self.settler.handing_over:
            self.freed = set()  # their slots went to their destinations' next due already
        return True

    def start_handing_over(self) -> None:
        if self.settler is not None:
            self.settler.start_handing_over(self.settings.webhook_lease, self.submit)

    def stop_handing_over(self) -> None:
        """The pump is done: the answers' slots stay free (what was handed over is sent
        and collected)."""
        if self.settler is not None:
            self.settler.stop_handing_over()

    def record_collected(self) -> set[tuple[int, str]]:
        """Record the answers `collect` took; the destinations of those it recorded now
        (their slots were still leased until now)."""
        answered, self.answered = self.answered, []
        settled, self.settled = self.settled, []
        if answered or settled:
            self.outcomes.update(
                (outcome.delivery_id, outcome) for outcome in self.record(answered, settled)
            )
        self.freed = set()
        return {claim.destination_key for claim, _ in answered}

    def record(
        self,
        answered: Sequence[tuple[Claim, WebhookAnswer]],
        settled: Sequence[Acknowledged],
    ) -> list[DeliveryOutcome]:
        # Wait for the database rather than lose answers, up to one lease past the
        # claim's (docs/decisions/0009-record-answers-through-outages.md).
        return retry_while_unreachable(
            partial(_record_answers, self.sessions, answered, settled, self.settings, self.clock),
            deadline=self.lease_ends + self.settings.webhook_lease,
            what="recording webhook answers",
        )

    def take_next(self, destinations: set[tuple[int, str]]) -> set[tuple[int, str]]:
        """Claim and send the next due deliveries of `destinations`, within the slots each
        has free; those another claim was counting (to look at again)."""
        if not destinations:
            return set()
        with transaction(self.sessions) as session:
            now = self.clock()
            claimed = claim_next_due(
                session,
                destinations,
                now=now,
                lease_seconds=self.settings.webhook_lease,
                concurrency=self.settings.destination_concurrency,
                probe_seconds=self.settings.destination_probe,
            )
            self.read_secrets(session, claimed.claims, now)
        self.lease_ends = time.monotonic() + self.settings.webhook_lease
        self.submit(claimed.claims)
        return claimed.contended

    def ring_backlog(self, destinations: set[tuple[int, str]]) -> None:
        """The pump's time is up: hand the destinations' next due deliveries to other jobs."""
        if not destinations or self.on_outcomes is None:
            return
        with transaction(self.sessions) as session:
            due = next_due_ids(session, destinations, now=self.clock())
        if due:
            self.on_outcomes(
                [
                    DeliveryOutcome(
                        due[0], attempted=False, skipped="claimed", follow_up_ids=tuple(due)
                    )
                ]
            )

    def hand_off(self, *, ring_next: bool) -> None:
        """Let the attempts still in flight record themselves when their answer comes (and,
        `ring_next`, ring their destination's next due deliveries: the slot is free)."""
        self.in_flight()  # hand-overs are stopped: nothing is submitted after this
        for future in list(self.waiting):
            future.add_done_callback(
                partial(self._record_alone, self.sending[future], ring_next=ring_next)
            )
        self.waiting = set()

    def _record_alone(
        self, claim: Claim, future: Future[WebhookAnswer], *, ring_next: bool
    ) -> None:
        try:
            answer = future.result()
            acknowledged = None
            if self.settler is not None and answer.succeeded and not claim.probe:
                acknowledged = self.settler.recorded(claim.id)
            answered = [] if acknowledged else [(claim, answer)]
            outcomes = self.record(answered, [acknowledged] if acknowledged else [])
            if self.on_outcomes is not None:
                self.on_outcomes(outcomes)
            if ring_next:
                self.ring_backlog({claim.destination_key})
        except Exception:  # its lease expires and it is sent again: log, never raise here
            log.exception("could not record the answer to delivery %s", claim.id)

    def raise_unsent(self) -> None:
        if self.unsent is not None:
            raise self.unsent


class Settler:
    """Records a batch's 2xx answers from the sending threads that read them, group-committed
    (PostgreSQL; docs/decisions/0008-record-acknowledged-answers-at-once.md).

    The job's thread collects what each came to (`recorded`) and handles the rest (a row
    taken over meanwhile, the database away).
    """

    def __init__(self, engine: Engine, clock: Callable[[], datetime]) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._waiting: list[tuple[Claim, WebhookAnswer]] = []
        self._in_flight = False
        self._outcomes: dict[str, Acknowledged | None] = {}
        # While the job pumps: the lease of the deliveries its answers hand their slots
        # to (`hand_over_slots`), and how to send them.
        self._hand_over_lease: float | None = None
        self._send: Callable[[list[Claim]], None] = lambda claims: None

    def start_handing_over(self, lease_seconds: float, send: Callable[[list[Claim]], None]) -> None:
        """From now, the slots of 2xx answers go to their destinations' next due
        deliveries, which `send` sends at once, from the sending thread that answered."""
        with self._lock:
            self._hand_over_lease = lease_seconds
            self._send = send

    def stop_handing_over(self) -> None:
        """No more hand-overs, once the statement in flight is done."""
        with self._lock:
            self._hand_over_lease = None
            self._settled.wait_for(lambda: not self._in_flight)

    @property
    def handing_over(self) -> bool:
        return self._hand_over_lease is not None

    def settle(self, claim: Claim, answer: WebhookAnswer) -> None:
        """Record one 2xx answer: now, with those waiting, or right after the statement in
        flight, by the thread that sent it."""
        with self._lock:
            self._waiting.append((claim, answer))
            if self._in_flight:
                return
            self._in_flight = True
        batch: list[tuple[Claim, WebhookAnswer]] = []
        try:
            while batch := self._take_waiting():
                acknowledged = self._record(batch)
                self._publish(batch, acknowledged)
        except BaseException:  # a bug: what was not recorded is left to the job's thread
            with self._lock:
                batch, self._waiting, self._in_flight = batch + self._waiting, [], False
            self._publish(batch, [])
            raise

    def _take_waiting(self) -> list[tuple[Claim, WebhookAnswer]]:
        with self._lock:
            batch, self._waiting = self._waiting, []
            self._in_flight = bool(batch)
            if not batch:
                self._settled.notify_all()
            return batch

    def _hand_over(self, connection: Connection, batch: list[tuple[Claim, WebhookAnswer]]) -> None:
        """While the job pumps, the answers' slots go to their destinations' next due
        deliveries before the answers free them, and those go out at once."""
        with self._lock:
            lease_seconds, send = self._hand_over_lease, self._send
        if lease_seconds is None:
            return
        freed: dict[int, int] = {}
        for claim, _ in batch:
            freed[claim.destination_id] = freed.get(claim.destination_id, 0) + 1
        handed = hand_over_slots(connection, freed, now=self._clock(), lease_seconds=lease_seconds)
        if handed:
            send(handed)

    def _publish(
        self, batch: list[tuple[Claim, WebhookAnswer]], acknowledged: list[Acknowledged]
    ) -> None:
        settled = {entry[0].id: entry for entry in acknowledged}
        with self._lock:
            self._outcomes.update((claim.id, settled.get(claim.id)) for claim, _ in batch)
            self._settled.notify_all()

    def recorded(self, claim_id: str) -> Acknowledged | None:
        """What the answer to `claim_id`, handed to `settle`, came to once recorded; None if
        it was not (the row is not ours any more, or the database is away)."""
        with self._lock:
            self._settled.wait_for(lambda: claim_id in self._outcomes)
            return self._outcomes.pop(claim_id)

    def _record(self, batch: list[tuple[Claim, WebhookAnswer]]) -> list[Acknowledged]:
        try:
            with self._engine.connect() as connection:
                self._hand_over(connection, batch)
                return settle_acknowledged(connection, batch, now=self._clock())
        except OperationalError:  # the database is away: the job's thread waits for it and records
            return []


def _send_and_settle(
    claim: Claim,
    secrets: Sequence[str],
    *,
    settler: Settler | None,
    clock: Callable[[], datetime],
    **request: Any,
) -> WebhookAnswer:
    """Send one webhook; a 2xx answer goes to `settler` at once, from this thread."""
    answer = send_webhook(
        claim.callback_url, claim.id, claim.payload, secrets, clock=clock, **request
    )
    if settler is not None and answer.succeeded and not claim.probe:
        settler.settle(claim, answer)
    return answer


def _record_answers(
    sessions: Sessions,
    answered: Sequence[tuple[Claim, WebhookAnswer]],
    settled: Sequence[Acknowledged],
    settings: Settings,
    clock: Callable[[], datetime],
) -> list[DeliveryOutcome]:
    """Record the answers not recorded yet, then count, log and follow up all of them
    (`settled`: those the sending threads recorded). On PostgreSQL, the 2xx answers to
    rows still ours go first, in one autocommitted statement (`settle_acknowledged`);
    the others in one transaction."""
    now = clock()
    settled = list(settled)
    autocommit = autocommit_engine(sessions)
    if autocommit is not None and answered:
        with autocommit.connect() as connection:
            settled += settle_acknowledged(connection, answered, now=now)
    done = {row.id for row, _, _ in settled}
    rest = [(claim, answer) for claim, answer in answered if claim.id not in done]
    with transaction(sessions) as session:
        return record_attempts(session, rest, settings=settings, now=now, settled=settled)


def _not_claimed(
    session: Session, delivery_ids: list[str], now: datetime, held: dict[str, str]
) -> list[DeliveryOutcome]:
    """Explain why deliveries could not be claimed, for logs and the caller."""
    outcomes = [
        DeliveryOutcome(delivery_id, attempted=False, status=DELIVERY_PENDING, skipped=reason)
        for delivery_id, reason in held.items()
    ]
    delivery_ids = [delivery_id for delivery_id in delivery_ids if delivery_id not in held]
    if not delivery_ids:
        return outcomes
    rows = {
        row.id: row
        for row in session.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.status,
                WebhookDelivery.next_attempt_at,
                older_event_unsettled(now).label("waiting"),
            ).where(among_ids(delivery_ids, session))
        )
    }
    for delivery_id in delivery_ids:
        row = rows.get(delivery_id)
        if row is None:
            outcomes.append(DeliveryOutcome(delivery_id, attempted=False, skipped="not_found"))
            continue
        if row.status != DELIVERY_PENDING:
            reason = "not_pending"
        elif row.next_attempt_at is None or row.next_attempt_at > now:
            reason = "not_due"
        elif row.waiting:
            reason = "waiting_for_older"
        else:  # leased, or locked by a claim not yet committed (PostgreSQL's SKIP LOCKED)
            reason = "claimed"
        outcomes.append(
            DeliveryOutcome(
                delivery_id,
                attempted=False,
                status=row.status,
                next_attempt_at=row.next_attempt_at,
                skipped=reason,
            )
        )
    return outcomes
