"""One `deliver` job in flight: its claims sent, their answers collected and recorded.

`DeliverJob` is the machinery of `tracker.delivery.attempt.attempt_deliveries`: it
submits claims to the process's sending threads, collects the answers as they come in,
records them (`tracker.delivery.outcome`), takes the next due deliveries of the
destinations whose slots the answers free (the pump), and hands the attempts still in
flight over to their sending threads when only slow answers are left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from datetime import datetime
from functools import partial
from typing import Any

import requests
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tracker.config import Settings
from tracker.db.engine import autocommit_engine, retry_while_unreachable, transaction
from tracker.delivery.claims import Claim, claim_next_due
from tracker.delivery.netguard import Resolver
from tracker.delivery.outbox import next_due_ids
from tracker.delivery.outcome import (
    Acknowledged,
    DeliveryOutcome,
    record_attempts,
    settle_acknowledged,
)
from tracker.delivery.sender import WebhookAnswer, send_pool, send_webhook
from tracker.delivery.settler import Settler
from tracker.tracking.clients import secrets_in_force

Sessions = Engine | sessionmaker[Session]

log = logging.getLogger("tracker.delivery")


class DeliverJob:
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
