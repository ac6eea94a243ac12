"""Per-service pace: a song of 3 minutes is not polled every 5 s for its whole life."""

from __future__ import annotations

from datetime import UTC, datetime

from tracker.config import Settings, load_settings
from tracker.polling.schedule import fresh_interval, next_poll_at, service_paces

CREATED = datetime(2026, 1, 1, tzinfo=UTC)


def polls_until_done(seconds: float, service: str | None, settings: Settings) -> int:
    """Polls a task gets from registration (polled at once) to the first poll after it ended."""
    now, polls = CREATED, 0
    while True:
        polls += 1
        if (now - CREATED).total_seconds() >= seconds:
            return polls
        now = next_poll_at(CREATED, now, settings, service=service)


def test_a_three_minute_song_costs_fewer_polls_at_the_vendors_pace() -> None:
    settings = load_settings(_env_file=None)
    unpaced = polls_until_done(180, None, settings)
    paced = polls_until_done(180, "suno", settings)
    print(f"\npolls for a 3-minute Suno song: {unpaced} at 5 s, {paced} at Suno's pace")
    assert (unpaced, paced) == (34, 19)
    # Still seen within one pace of its end: at most 10 s (or 5 % of its age) late.
    assert paced >= 180 / max(10, 180 * 0.05) * 0.9


def test_a_pace_is_a_default_the_user_overrides_never_below_the_poll_interval() -> None:
    settings = load_settings(_env_file=None)
    assert fresh_interval("suno", settings) == 10.0
    assert fresh_interval("luma", settings) == settings.poll_interval
    assert fresh_interval("qrart", settings) == settings.poll_interval
    tuned = load_settings(_env_file=None, service_poll_intervals="suno=30,luma=8,kling=1")
    assert (fresh_interval("suno", tuned), fresh_interval("luma", tuned)) == (30.0, 8.0)
    assert fresh_interval("kling", tuned) == tuned.poll_interval  # not below the interval
    assert "kling" not in service_paces(tuned)


def test_old_tasks_back_off_as_any_other() -> None:
    settings = load_settings(_env_file=None)
    hour_old = CREATED.replace(hour=1)
    for service in ("suno", "luma"):
        assert (next_poll_at(CREATED, hour_old, settings, service=service) - hour_old).seconds == 60


def test_a_bad_pace_is_refused_naming_the_variable_and_the_value() -> None:
    import pytest

    from tracker.errors import ConfigError

    for bad in ("suno", "suno=fast", "Suno=3", "suno=0", "suno=-2"):
        with pytest.raises(ConfigError, match="TRACKER_SERVICE_POLL_INTERVALS"):
            load_settings(_env_file=None, service_poll_intervals=bad)
