"""UTC time, in one place: aware datetimes in, ISO 8601 with a `Z` out."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat_z(moment: datetime | None) -> str | None:
    """`2024-08-31T04:12:46.241000Z`, the form of every time the service shows."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
