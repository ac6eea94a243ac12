"""UTC time, in one place: aware datetimes in, ISO 8601 with a `Z` out; `Retry-After` read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat_z(moment: datetime | None) -> str | None:
    """`2024-08-31T04:12:46.241000Z`, the form of every time the service shows."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class RetryAfter:
    """A `Retry-After` header read as a wait, bounded.

    `seconds` is within [0, the caller's limit], or None when the header could not be
    read (the caller then does what it does without one); `note` says why the value
    was not taken as given (larger than the limit, infinite, malformed), for the log.
    """

    header: str
    seconds: float | None
    note: str | None = None


def parse_retry_after(value: str | None, *, now: datetime, limit: float) -> RetryAfter | None:
    """The one reader of `Retry-After` (a receiver's and the upstream's); None if absent.

    Takes delta-seconds (a decimal number too, as some servers send) or an HTTP date
    (in the past: 0). Anything larger than `limit`, `inf` and numbers too large for a
    float included, is clamped to `limit`; a negative number, `nan` or text that is
    neither form is unreadable (`seconds` None). It never raises.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    header = text[:_MAX_SHOWN_HEADER]
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = _seconds_until_http_date(text, now)
        if seconds is None:
            return RetryAfter(header, None, "is neither delta-seconds nor an HTTP date")
    if math.isnan(seconds) or seconds < 0:
        return RetryAfter(header, None, "is not a number of seconds from now")
    if seconds > limit:
        return RetryAfter(header, float(limit), f"is longer than the {limit:g} s allowed")
    return RetryAfter(header, seconds)


# Enough of a header to show in a log line.
_MAX_SHOWN_HEADER = 100


def _seconds_until_http_date(text: str, now: datetime) -> float | None:
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000": the date is UTC without saying so
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())
