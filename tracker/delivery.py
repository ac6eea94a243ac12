"""Webhook delivery: claim a batch of outbox rows, send one attempt each, schedule the next.

One call of `attempt_deliveries` (a `deliver` job) is three steps, so no
database transaction is open while a receiver is slow:

1. a short transaction claims the due rows of the batch with a lease, in one
   statement, and reads their payloads, URLs and the clients' secrets in force
   (`tracker.outbox`);
2. outside any transaction, the process's sending threads each resolve and vet
   a callback host (`tracker.netguard`) and POST the stored payload to the
   vetted address, all requests of the batch at once (`tracker.sender`);
3. the answers are recorded as they come in: on PostgreSQL the 2xx answers to
   rows still ours in one autocommitted statement (`settle_acknowledged`), the
   others in a short transaction that applies the outcome rules to the rows still
   ours; a row that changed meanwhile (superseded, retried by hand, lease taken
   over) only gets its attempt logged (`tracker.attempts`).

The retry schedule lives on the row (`next_attempt_at`), never in broker
countdowns. Nothing here knows about Celery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from datetime import datetime
from functools import partial

import requests
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from tracker.attempts import DeliveryOutcome, record_attempts, settle_acknowledged
from tracker.clients import secrets_in_force
from tracker.config import Settings
from tracker.db import autocommit_engine, retry_while_unreachable
from tracker.models import WebhookDelivery
from tracker.netguard import Resolver
from tracker.outbox import Claim, among_ids, claim_deliveries, older_event_unsettled
from tracker.sender import WebhookAnswer, send_pool, send_webhook
from tracker.states import DELIVERY_PENDING
from tracker.timeutil import utcnow

Sessions = Engine | sessionmaker[Session]


@contextmanager
def _transaction(sessions: Sessions) -> Iterator[Session]:
    if isinstance(sessions, Engine):
        with Session(sessions, expire_on_commit=False) as session, session.begin():
            yield session
    else:
        with sessions.begin() as session:
            yield session


def attempt_delivery(
    sessions: Sessions,
    delivery_id: str,
    *,
    settings: Settings,
    http: requests.Session | None = None,
    resolver: Resolver | None = None,
    now_fn: Callable[[], datetime] = utcnow,
) -> DeliveryOutcome:
    """One attempt of one due delivery: `attempt_deliveries` of a single id."""
    (outcome,) = attempt_deliveries(
        sessions, [delivery_id], settings=settings, http=http, resolver=resolver, now_fn=now_fn
    )
    return outcome


def attempt_deliveries(
    sessions: Sessions,
    delivery_ids: Iterable[str],
    *,
    settings: Settings,
    http: requests.Session | None = None,
    resolver: Resolver | None = None,
    now_fn: Callable[[], datetime] = utcnow,
) -> list[DeliveryOutcome]:
    """One attempt of each due delivery of a batch; an outcome per id, in order.

    A short transaction claims the batch and reads the payloads and the
    clients' secrets; the requests then go out at once from the process's
    sending threads (`tracker.sender.send_pool`), outside any transaction; the
    answers are recorded as they come in (those in together in one transaction),
    so neither a slow receiver nor a dying worker holds back the record of the
    others. Safe to call twice for the same ids at once (a duplicated job): the
    lease lets one call send, the other returns `attempted=False`.
    """
    ids = list(dict.fromkeys(delivery_ids))
    with _transaction(sessions) as session:
        now = now_fn()
        claims = claim_deliveries(session, ids, now=now, lease_seconds=settings.webhook_lease)
        lease_ends = time.monotonic() + settings.webhook_lease
        claimed = {claim.id for claim in claims}
        outcomes = {
            outcome.delivery_id: outcome
            for outcome in _not_claimed(session, [i for i in ids if i not in claimed], now)
        }
        secrets = secrets_in_force(session, {claim.client_id for claim in claims}, now=now)

    pool = send_pool()
    sending = {
        pool.submit(
            send_webhook,
            claim.callback_url,
            claim.id,
            claim.payload,
            secrets.get(claim.client_id, ()),
            timeout=settings.webhook_timeout,
            allow_private=settings.webhook_allow_private,
            http=http,
            resolver=resolver,
            now_fn=now_fn,
        ): claim
        for claim in claims
    }
    unsent: BaseException | None = None
    waiting: set[Future[WebhookAnswer]] = set(sending)
    while waiting:
        # Every answer in so far, recorded at once: an answer acknowledged but not yet
        # recorded is sent again if the worker dies, so none waits for the others.
        done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
        answered = []
        for future in done:
            error = future.exception()
            if error is None:
                answered.append((sending[future], future.result()))
            else:  # a bug, not a receiver's answer: its lease expires and it is tried again
                unsent = unsent or error
        if answered:
            # The receivers have answered: if the database is away (restarting), wait for
            # it rather than lose the answers, each of which would be sent again once its
            # lease expires (a duplicate for the receiver). Past the lease too: while the
            # database is away nobody can claim the rows again, and a record arriving
            # after someone has is only logged (`record_attempts`). One more lease at
            # most, so that no thread waits for ever.
            recorded = retry_while_unreachable(
                partial(_record_answers, sessions, answered, settings, now_fn),
                deadline=lease_ends + settings.webhook_lease,
                what="recording webhook answers",
            )
            outcomes.update((outcome.delivery_id, outcome) for outcome in recorded)
    if unsent is not None:
        raise unsent
    return [outcomes[delivery_id] for delivery_id in ids]


def _record_answers(
    sessions: Sessions,
    answered: Sequence[tuple[Claim, WebhookAnswer]],
    settings: Settings,
    now_fn: Callable[[], datetime],
) -> list[DeliveryOutcome]:
    """Record the answers: on PostgreSQL, the 2xx answers to rows still ours first, in one
    autocommitted statement (`settle_acknowledged`); the others in one transaction."""
    now = now_fn()
    settled = []
    autocommit = autocommit_engine(sessions)
    if autocommit is not None:
        with autocommit.connect() as connection:
            settled = settle_acknowledged(connection, answered, now=now)
    done = {row.id for row, _, _ in settled}
    rest = [(claim, answer) for claim, answer in answered if claim.id not in done]
    with _transaction(sessions) as session:
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
