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

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from datetime import datetime
from functools import partial
from typing import Any

import requests
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.engine import autocommit_engine, retry_while_unreachable, transaction
from tracker.db.models import WebhookDelivery
from tracker.delivery.netguard import Resolver
from tracker.delivery.outbox import Claim, among_ids, claim_deliveries, older_event_unsettled
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
    (outcome,) = attempt_deliveries(
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
) -> list[DeliveryOutcome]:
    """One attempt of each due delivery of a batch; an outcome per id, in order.

    A short transaction claims the batch and reads the payloads and the
    clients' secrets; the requests then go out at once from the process's
    sending threads (`tracker.delivery.sender.send_pool`), outside any transaction; the
    answers are recorded as they come in (a 2xx by the thread that read it, on
    PostgreSQL), so neither a slow receiver nor a dying worker holds back the
    record of the others. Safe to call twice for the same ids at once (a duplicated
    job): the lease lets one call send, the other returns `attempted=False`.
    """
    ids = list(dict.fromkeys(delivery_ids))
    with transaction(sessions) as session:
        now = clock()
        claims = claim_deliveries(session, ids, now=now, lease_seconds=settings.webhook_lease)
        lease_ends = time.monotonic() + settings.webhook_lease
        claimed = {claim.id for claim in claims}
        outcomes = {
            outcome.delivery_id: outcome
            for outcome in _not_claimed(session, [i for i in ids if i not in claimed], now)
        }
        secrets = secrets_in_force(session, {claim.client_id for claim in claims}, now=now)

    pool = send_pool()
    autocommit = autocommit_engine(sessions)
    settler = None if autocommit is None else Settler(autocommit, clock)
    send = partial(
        _send_and_settle,
        settler=settler,
        timeout=settings.webhook_timeout,
        allow_private=settings.webhook_allow_private,
        max_retry_after=settings.max_retry_after,
        http=http,
        resolver=resolver,
        clock=clock,
    )
    sending = {
        pool.submit(send, claim, secrets.get(claim.client_id, ())): claim for claim in claims
    }
    unsent: BaseException | None = None
    waiting: set[Future[WebhookAnswer]] = set(sending)
    while waiting:
        # Every answer in so far, recorded at once (the 2xx ones by their sending threads
        # already): an answer acknowledged but not yet recorded is sent again if the
        # worker dies, so none waits for the others.
        done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
        answered, settled = [], []
        for future in done:
            error = future.exception()
            if error is not None:  # a bug, not a receiver's answer: its lease expires, tried again
                unsent = unsent or error
                continue
            claim, answer = sending[future], future.result()
            acknowledged = None
            if settler is not None and answer.succeeded:
                acknowledged = settler.recorded(claim.id)
            if acknowledged is None:
                answered.append((claim, answer))
            else:
                settled.append(acknowledged)
        if answered or settled:
            # Wait for the database rather than lose answers, up to one lease past the
            # claim's (docs/decisions/0009-record-answers-through-outages.md).
            recorded = retry_while_unreachable(
                partial(_record_answers, sessions, answered, settled, settings, clock),
                deadline=lease_ends + settings.webhook_lease,
                what="recording webhook answers",
            )
            outcomes.update((outcome.delivery_id, outcome) for outcome in recorded)
    if unsent is not None:
        raise unsent
    return [outcomes[delivery_id] for delivery_id in ids]


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
            return batch

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
    if settler is not None and answer.succeeded:
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


def _not_claimed(session: Session, delivery_ids: list[str], now: datetime) -> list[DeliveryOutcome]:
    """Explain why deliveries could not be claimed, for logs and the caller."""
    if not delivery_ids:
        return []
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
    outcomes = []
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
