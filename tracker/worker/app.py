"""The Celery app and the beat schedule, configured from Settings.

The broker is a doorbell, not the truth: every piece of work is
a row with a due time, and the beat's ticks find due rows again if messages are
lost. Without TRACKER_BROKER_URL the broker is embedded (kombu's SQLAlchemy
transport on a SQLite file), so `tracker up` needs no server.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.signals import setup_logging

from tracker.config import Settings, get_settings
from tracker.observability.logs import configure_logging
from tracker.polling import dispatch_interval

POLL_QUEUE = "polls"
DELIVERY_QUEUE = "deliveries"
SCHEDULE_QUEUE = "ticks"
JOBS_MODULE = "tracker.worker.jobs"
# When the daily retention sweep runs (UTC hour, minute).
PRUNE_AT = (3, 17)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration for these settings: broker, queues, routes, beat schedule."""
    config: dict[str, Any] = {
        "broker_url": settings.effective_broker_url,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "timezone": "UTC",
        "enable_utc": True,
        "broker_connection_retry_on_startup": True,
        # Jobs carry ids and re-read rows; each is safe to run twice (leases,
        # status checks), so a job lost with its worker is simply run again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "task_default_queue": SCHEDULE_QUEUE,
        "task_routes": {
            "tracker.poll_batches": {"queue": POLL_QUEUE},
            "tracker.deliver": {"queue": DELIVERY_QUEUE},
        },
        "beat_schedule": {
            "dispatch-polls": {
                "task": "tracker.dispatch_polls",
                "schedule": dispatch_interval(settings),
                "options": {"expires": dispatch_interval(settings) * 2},
            },
            "sweep": {
                "task": "tracker.sweep",
                "schedule": settings.sweep_interval,
                "options": {"expires": settings.sweep_interval * 2},
            },
            # Retention, once a day at a quiet hour (a no-op unless TRACKER_RETENTION_DAYS).
            "prune": {
                "task": "tracker.prune",
                "schedule": crontab(minute=PRUNE_AT[1], hour=PRUNE_AT[0]),
                "options": {"expires": 3600},
            },
        },
    }
    if settings.uses_embedded_broker:
        # Several processes share the SQLite queue file: wait for its lock, don't fail.
        config["broker_transport_options"] = {"connect_args": {"timeout": 30}}
    return config


def make_celery(settings: Settings) -> Celery:
    """A Celery app of its own for `settings` (tests, tools that talk to another broker)."""
    app = Celery("tracker", include=[JOBS_MODULE])
    app.conf.update(celery_config(settings))
    return app


# The app the jobs are registered on. Its configuration is read from the settings when
# it is first used, not when this module is imported.
celery_app = Celery("tracker", include=[JOBS_MODULE])
celery_app.add_defaults(lambda: celery_config(get_settings()))


@setup_logging.connect  # type: ignore[untyped-decorator]
def _use_tracker_logging(**_: Any) -> None:
    """Workers and beats log like every other role (JSON lines, secrets masked)."""
    configure_logging(get_settings())
