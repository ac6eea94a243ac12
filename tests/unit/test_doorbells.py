"""Gathered delivery doorbells: many rings, few jobs, none later than the window."""

from __future__ import annotations

import threading
import time

from tracker.worker.doorbells import Doorbell


class Sent:
    """What the doorbell handed on, and when (time.monotonic())."""

    def __init__(self, *, fail_first: int = 0) -> None:
        self.batches: list[tuple[float, list[str]]] = []
        self.arrived = threading.Event()
        self._failures_left = fail_first

    def __call__(self, batch: list[str]) -> None:
        if self._failures_left:
            self._failures_left -= 1
            raise ConnectionError("broker down")
        self.batches.append((time.monotonic(), batch))
        self.arrived.set()

    def ids(self) -> list[list[str]]:
        return [batch for _, batch in self.batches]


def test_ids_rung_within_the_window_go_out_as_one_batch_when_it_ends() -> None:
    sent = Sent()
    doorbell = Doorbell(sent, window=0.2, batch_size=50)
    rung_at = time.monotonic()
    doorbell.ring(["a", "b"])
    doorbell.ring(["c"])
    doorbell.ring(["b", "d"])  # a repeat goes once
    assert sent.arrived.wait(2)
    assert sent.ids() == [["a", "b", "c", "d"]]
    waited = sent.batches[0][0] - rung_at
    assert 0.15 <= waited < 1.0, waited


def test_a_full_batch_goes_at_once_and_the_rest_after_the_window() -> None:
    sent = Sent()
    doorbell = Doorbell(sent, window=0.3, batch_size=50)
    ids = [f"msg_{n}" for n in range(120)]
    rung_at = time.monotonic()
    doorbell.ring(ids)
    assert [len(batch) for batch in sent.ids()] == [50, 50]  # sent by ring itself
    deadline = time.monotonic() + 2
    while len(sent.batches) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent.ids() == [ids[:50], ids[50:100], ids[100:]]
    assert sent.batches[2][0] - rung_at >= 0.25


def test_flush_sends_what_is_gathered_now() -> None:
    sent = Sent()
    doorbell = Doorbell(sent, window=60, batch_size=50)
    doorbell.ring(["a", "b"])
    doorbell.flush()
    assert sent.ids() == [["a", "b"]]
    doorbell.flush()  # nothing left: nothing sent
    assert sent.ids() == [["a", "b"]]


def test_a_failed_send_does_not_stop_later_rings() -> None:
    sent = Sent(fail_first=1)
    doorbell = Doorbell(sent, window=0.05, batch_size=50)
    doorbell.ring(["lost"])  # the broker is down: the sweep finds this one
    time.sleep(0.3)
    doorbell.ring(["next"])
    assert sent.arrived.wait(2)
    assert sent.ids() == [["next"]]
