"""Delivery doorbells, gathered: one `deliver` job for the deliveries of many polls.

Ids rung within `DOORBELL_WINDOW` go as one deliver job per batch of up to
`DELIVERY_BATCH`; the sweep covers a dying worker's
(docs/decisions/0007-batched-deliveries-and-doorbells.md). Nothing here knows about
Celery: `send` enqueues one batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from tracker.delivery.outbox import DELIVERY_BATCH

log = logging.getLogger("tracker.doorbells")

# How long a rung id may wait for others: short next to the poll interval, long
# enough that a busy worker's polls fill batches.
DOORBELL_WINDOW = 0.1


class Doorbell:
    """Gathers rung delivery ids and hands them to `send` in batches, `window` seconds late
    at most; thread-safe, with one daemon thread started on first use."""

    def __init__(
        self,
        send: Callable[[list[str]], None],
        *,
        window: float = DOORBELL_WINDOW,
        batch_size: int = DELIVERY_BATCH,
    ) -> None:
        self._send = send
        self._window = window
        self._batch_size = batch_size
        self._pending: dict[str, None] = {}  # insertion-ordered, without repeats
        self._first_rung = 0.0  # time.monotonic() when the oldest pending id was rung
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def ring(self, delivery_ids: Iterable[str]) -> None:
        """Send these ids within the window; full batches go at once."""
        full: list[list[str]] = []
        with self._changed:
            if not self._pending:
                self._first_rung = time.monotonic()
            self._pending.update(dict.fromkeys(delivery_ids))
            while len(self._pending) >= self._batch_size:
                full.append(self._take(self._batch_size))
            if self._pending:
                self._start()
                self._changed.notify()
        for batch in full:
            self._send(batch)

    def flush(self) -> None:
        """Send every pending id now (a worker stopping calls this)."""
        with self._changed:
            batches = []
            while self._pending:
                batches.append(self._take(self._batch_size))
        for batch in batches:
            self._send(batch)

    def _take(self, count: int) -> list[str]:
        taken = list(self._pending)[:count]
        for delivery_id in taken:
            del self._pending[delivery_id]
        return taken

    def _start(self) -> None:
        # Not alive also after a fork (a prefork pool's child): start one of its own.
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="doorbell", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending))
                due = self._first_rung + self._window
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                self.flush()
            except Exception:  # never let the thread die; the sweep covers what was not sent
                log.exception("could not ring delivery doorbells; the sweep will")
