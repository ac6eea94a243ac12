"""The one reader of `Retry-After`, for receivers and the upstream: bounded, never raising."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from tracker.clock import RetryAfter, parse_retry_after
from tracker.upstream.budget import bounded_pause

NOW = datetime(2024, 8, 31, 4, 12, 46, tzinfo=UTC)


def read(header: str | None, limit: float = 300) -> RetryAfter | None:
    return parse_retry_after(header, now=NOW, limit=limit)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), (" 7 ", 7.0), ("0", 0.0), ("0.5", 0.5), ("300", 300.0)],
)
def test_delta_seconds_within_the_limit_are_taken_as_given(header: str, seconds: float) -> None:
    assert read(header) == RetryAfter(header.strip(), seconds, None)


def test_an_http_date_is_read_as_seconds_from_now() -> None:
    in_a_minute = format_datetime(NOW + timedelta(seconds=60), usegmt=True)
    assert read(in_a_minute) == RetryAfter(in_a_minute, 60.0, None)
    an_hour_ago = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert read(an_hour_ago) == RetryAfter(an_hour_ago, 0.0, None)
    unzoned = "Sat, 31 Aug 2024 04:13:46 -0000"  # UTC without saying so
    assert read(unzoned) == RetryAfter(unzoned, 60.0, None)


@pytest.mark.parametrize(
    "header",
    [
        "301",
        "31536000",
        "inf",
        "Infinity",
        "1e400",
        "9" * 5000,
        "Fri, 31 Dec 9999 23:59:59 GMT",
    ],
)
def test_larger_or_infinite_values_are_clamped_to_the_limit_with_a_note(header: str) -> None:
    answer = read(header)
    assert answer is not None
    assert answer.seconds == 300.0
    assert answer.note == "is longer than the 300 s allowed"
    assert len(answer.header) <= 100  # what the log shows


@pytest.mark.parametrize(
    "header",
    ["nan", "-5", "-inf", "soon", "Mon, 99 Foo 99999 99:99:99 GMT", "5 seconds", "\x00"],
)
def test_unreadable_values_give_no_wait_and_a_note(header: str) -> None:
    answer = read(header)
    assert answer is not None
    assert answer.seconds is None
    assert answer.note is not None


@pytest.mark.parametrize("header", [None, "", "   "])
def test_no_value_is_no_retry_after(header: str | None) -> None:
    assert read(header) is None


def test_a_limit_of_zero_clamps_everything_to_now() -> None:
    assert read("5", limit=0) == RetryAfter("5", 0.0, "is longer than the 0 s allowed")


@pytest.mark.parametrize(
    ("seconds", "bounded"),
    [(5.0, 5.0), (-1.0, 0.0), (1e9, 60.0), (float("inf"), 60.0), (float("nan"), 60.0)],
)
def test_a_budget_pause_is_bounded(seconds: float, bounded: float) -> None:
    assert bounded_pause(seconds, 60.0) == bounded
