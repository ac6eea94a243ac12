"""Webhook delivery: claim a batch of outbox rows, send one attempt each, schedule the next.

One call of `attempt_deliveries` (a `deliver` job) is three steps, so no
database transaction is open while a receiver is slow:

1. a short transaction claims the due rows of the batch with a lease, in one
   statement, and reads their payloads, URLs and the clients' secrets in force
   (`tracker.delivery.claims`);
2. outside any transaction, the process's sending threads each resolve and vet
   a callback host (`tracker.delivery.netguard`) and POST the stored payload to the
   vetted address, all requests of the batch at once (`tracker.delivery.sender`);
3. the answers are recorded as they come in: on PostgreSQL, a 2xx answer to a row
   still ours by the sending thread that read it, with any others waiting, in one
   autocommitted statement (`tracker.delivery.settler`); the others by the
   job's thread, in a short transaction that applies the outcome rules to the rows
   still ours; a row that changed meanwhile (superseded, retried by hand, lease taken
   over) only gets its attempt logged (`tracker.delivery.outcome`).

The job in flight (sending, collecting, recording, pumping) is
`tracker.delivery.pump.DeliverJob`. The retry schedule lives on the row
(`next_attempt_at`), never in broker countdowns. Nothing here knows about Celery.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime

import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.engine import transaction
from tracker.db.models import WebhookDelivery
from tracker.delivery.claims import claim_batch
from tracker.delivery.netguard import Resolver
from tracker.delivery.outbox import among_ids, older_event_unsettled
from tracker.delivery.outcome import DeliveryOutcome
from tracker.delivery.pump import DeliverJob, Sessions
from tracker.states import DELIVERY_PENDING


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
    job = DeliverJob(sessions, settings, http, resolver, clock, on_outcomes)
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
