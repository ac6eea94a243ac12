"""When a registration is polled: beat's tick, the claim's lease and look-ahead, the back-off."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from functools import lru_cache

from tracker.config import Settings
from tracker.profiles import advised_poll_intervals

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


def service_paces(settings: Settings) -> dict[str, float]:
    """Seconds between polls of a fresh task, per service with a pace of its own: what its
    vendor advises (its profile), or what `TRACKER_SERVICE_POLL_INTERVALS` says; never
    below `TRACKER_POLL_INTERVAL`. Other services poll fresh tasks at that interval."""
    overrides = tuple(sorted(settings.service_poll_intervals.items()))
    return dict(_paces(settings.poll_interval, overrides))


def fresh_interval(service: str | None, settings: Settings) -> float:
    """Seconds between polls of a fresh task of `service`."""
    if service is None:
        return settings.poll_interval
    overrides = tuple(sorted(settings.service_poll_intervals.items()))
    return _paces(settings.poll_interval, overrides).get(service, settings.poll_interval)


@lru_cache(maxsize=16)
def _paces(poll_interval: float, overrides: tuple[tuple[str, float], ...]) -> dict[str, float]:
    paces = {**advised_poll_intervals(), **dict(overrides)}
    return {
        service: pace
        for service, pace in sorted(paces.items())
        if pace > poll_interval  # a pace below the poll interval is the poll interval
    }


def next_poll_at(
    created_at: datetime, now: datetime, settings: Settings, *, service: str | None = None
) -> datetime:
    """Fresh tasks are polled every poll interval (or their service's pace); older ones back
    off in proportion to their age, up to the maximum."""
    age = (now - created_at).total_seconds()
    interval = min(
        settings.max_poll_interval,
        max(fresh_interval(service, settings), age * BACKOFF_SHARE_OF_AGE),
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
