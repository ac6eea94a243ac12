"""The beat schedule, as `make_celery` builds it from settings."""

from __future__ import annotations

from tracker.config import load_settings
from tracker.worker.app import make_celery


def test_beat_dispatches_every_second_so_polls_spread_over_the_poll_interval() -> None:
    settings = load_settings(poll_interval=5, sweep_interval=30, _env_file=None)
    schedule = make_celery(settings).conf.beat_schedule
    assert schedule["dispatch-polls"]["schedule"] == 1.0
    assert schedule["dispatch-polls"]["options"] == {"expires": 2.0}
    assert schedule["sweep"]["schedule"] == 30


def test_beat_dispatches_at_least_as_often_as_tasks_fall_due() -> None:
    settings = load_settings(poll_interval=0.5, _env_file=None)
    assert make_celery(settings).conf.beat_schedule["dispatch-polls"]["schedule"] == 0.5
