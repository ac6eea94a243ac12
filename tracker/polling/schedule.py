"""When a registration is polled: beat's tick, the claim's lease and look-ahead, the back-off."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from tracker.config import Settings

log = logging.getLogger("tracker.polling")


# Polls back off in proportion to a task's age: a task running for 10 minutes is
# polled every 30 s (5 % of its age), bounded by the poll interval settings.
BACKOFF_SHARE_OF_AGE = 0.05
# Beat ticks this often; each task keeps its first tick's phase, spreading polls over the
# interval (docs/decisions/0003-dispatch-every-second.md).
DISPATCH_INTERVAL = 1.0


def dispatch_interval(settings: Settings) -> float:
    """Seconds between two dispatch ticks of beat."""
    return min(DISPATCH_INTERVAL, settings.poll_interval)


def claim_limit(settings: Settings) -> int:
    """Registrations one tick may claim: what the upstream budget can serve until the next tick."""
    requests = max(1, int(settings.upstream_rps * dispatch_interval(settings)))
    return requests * settings.batch_size


def next_poll_at(created_at: datetime, now: datetime, settings: Settings) -> datetime:
    """Fresh tasks are polled every poll interval; older ones back off to the maximum."""
    age = (now - created_at).total_seconds()
    interval = min(
        settings.max_poll_interval, max(settings.poll_interval, age * BACKOFF_SHARE_OF_AGE)
    )
    return now + timedelta(seconds=interval)


def claim_lookahead(settings: Settings) -> float:
    """Seconds ahead of a tick whose due polls it takes (a quarter of the tick interval):
    beat and the broker move a tick by some milliseconds either way, and a poll due just
    after its tick would otherwise wait a whole tick."""
    return dispatch_interval(settings) / 4


def poll_lease(settings: Settings, lookahead: float) -> float:
    """Seconds a claim leases its registrations: `TRACKER_POLL_LEASE`, never past the tick
    that may claim them again (docs/decisions/0001-write-nothing-polling.md)."""
    return min(settings.poll_lease, settings.poll_interval - lookahead)
