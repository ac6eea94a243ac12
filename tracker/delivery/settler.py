"""Recording a batch's 2xx answers from the sending threads that read them (PostgreSQL).

A `Settler` group-commits the acknowledged answers of a `deliver` job in one
autocommitted statement each (`tracker.delivery.outcome.settle_acknowledged`), and while
the job pumps, first hands their slots over to their destinations' next due deliveries
(`tracker.delivery.claims.hand_over_slots`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import OperationalError

from tracker.delivery.claims import Claim, hand_over_slots
from tracker.delivery.outcome import Acknowledged, settle_acknowledged
from tracker.delivery.sender import WebhookAnswer


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
