"""The webhook retry schedule: when the next attempt of a failed delivery goes."""

from __future__ import annotations

import random
from collections.abc import Sequence

# Scheduled delays vary by +-20 %, so receivers that failed together are not retried together.
RETRY_JITTER = 0.2
MANUAL_RETRY_HINT = "`tracker deliveries retry {id}` or `POST /v1/deliveries/{id}/retry`"


def next_retry_delay(
    schedule: Sequence[float],
    attempts_made: int,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds before the next attempt once `attempts_made` failed; None: the schedule is done.

    `schedule[k]` is the delay before attempt k+1, jittered by +-20 %. A
    receiver's `Retry-After` is honoured: the attempt goes no sooner. It comes
    bounded by TRACKER_MAX_RETRY_AFTER (`tracker.clock.parse_retry_after`), so no
    receiver can push a delivery out for days.
    """
    if attempts_made >= len(schedule):
        return None
    nominal = schedule[attempts_made]
    delay = nominal * (rng or random).uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
