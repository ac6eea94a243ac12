"""Prometheus metrics: counters kept by each process, gauges read from the database.

Workers count what they do (upstream requests, deliveries, latencies) and
serve them on TRACKER_METRICS_PORT. When processes share one host (`tracker up`,
`tracker demo`), PROMETHEUS_MULTIPROC_DIR is set for all of them and the API's
`/metrics` shows every process's counters together. Levels that live in the
database (tasks by state, outbox backlog) are read at scrape time, so they are
right whichever process answers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from tracker.states import DELIVERY_FAILED, DELIVERY_STATUSES, DESTINATION_STATES, TASK_STATES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LAG_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)

TRANSITIONS = Counter("tracker_transitions_total", "Task state changes observed.", ["to_state"])
UPSTREAM_REQUESTS = Counter(
    "tracker_upstream_requests_total",
    "Requests to the upstream task API by action and outcome.",
    ["action", "outcome"],
)
UPSTREAM_LATENCY = Histogram(
    "tracker_upstream_request_seconds",
    "Duration of upstream requests.",
    ["action"],
    buckets=LATENCY_BUCKETS,
)
BUDGET_WAIT = Histogram(
    "tracker_upstream_budget_wait_seconds",
    "Time spent waiting for a slot in the upstream request budget.",
    buckets=LAG_BUCKETS,
)
POLL_OBSERVATIONS = Counter(
    "tracker_poll_observations_total",
    "Registrations compared with a poll answer (the answer written only where it changed them).",
)
POLL_JOBS_EXPIRED = Counter(
    "tracker_poll_jobs_expired_total",
    "Poll jobs a worker took after their lease ended, discarded unrun (workers are behind).",
)
POLL_LAG = Histogram(
    "tracker_poll_lag_seconds",
    "How late polls were claimed against their next_poll_at.",
    buckets=LAG_BUCKETS,
)
DELIVERIES = Counter(
    "tracker_deliveries_total",
    "Webhook delivery attempts by outcome (succeeded, retry, failed, ...).",
    ["outcome"],
)
DELIVERY_LATENCY = Histogram(
    "tracker_delivery_attempt_seconds",
    "Duration of webhook attempts.",
    buckets=LATENCY_BUCKETS,
)
COMPLETION_TO_DELIVERY = Histogram(
    "tracker_completion_to_delivery_seconds",
    "From the observed transition to the webhook's successful delivery.",
    buckets=LAG_BUCKETS,
)


@dataclass(frozen=True)
class DatabaseLevels:
    """Levels that live in the database, read at scrape time (`tracker.db.queries`)."""

    tasks_by_state: Mapping[str, int]
    deliveries_by_status: Mapping[str, int]
    deliveries_due: int
    destinations_by_state: Mapping[str, int] = field(default_factory=dict)
    deliveries_held: int = 0  # pending deliveries of destinations not healthy


class _LevelsCollector(Collector):
    def __init__(self, read_levels: Callable[[], DatabaseLevels]) -> None:
        self._read_levels = read_levels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tasks = GaugeMetricFamily("tracker_tasks", "Tracked tasks by state.", labels=["state"])
        deliveries = GaugeMetricFamily(
            "tracker_deliveries", "Webhook deliveries by status.", labels=["status"]
        )
        backlog = GaugeMetricFamily(
            "tracker_outbox_backlog",
            "Deliveries waiting: due now, or failed for good until retried by hand.",
            labels=["kind"],
        )
        destinations = GaugeMetricFamily(
            "tracker_destinations",
            "Webhook destinations by circuit state (healthy, open, disabled).",
            labels=["state"],
        )
        held = GaugeMetricFamily(
            "tracker_deliveries_held",
            "Pending deliveries held by destinations that are open or disabled.",
        )
        levels = self._read_levels()
        for state in sorted(TASK_STATES):
            tasks.add_metric([state], levels.tasks_by_state.get(state, 0))
        for status in sorted(DELIVERY_STATUSES):
            deliveries.add_metric([status], levels.deliveries_by_status.get(status, 0))
        backlog.add_metric(["due"], levels.deliveries_due)
        backlog.add_metric(["failed"], levels.deliveries_by_status.get(DELIVERY_FAILED, 0))
        for state in sorted(DESTINATION_STATES):
            destinations.add_metric([state], levels.destinations_by_state.get(state, 0))
        held.add_metric([], levels.deliveries_held)
        yield tasks
        yield deliveries
        yield backlog
        yield destinations
        yield held


def render(read_levels: Callable[[], DatabaseLevels] | None) -> bytes:
    """The text exposition for `/metrics`: this process (or all on the host) plus DB levels."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = REGISTRY
    output = generate_latest(registry)
    if read_levels is not None:
        levels = CollectorRegistry()
        levels.register(_LevelsCollector(read_levels))
        output += generate_latest(levels)
    return output


def serve_worker_metrics(port: int) -> bool:
    """Expose this worker's metrics on `port`; False if the port is taken (another worker)."""
    if not port:
        return False
    try:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            start_http_server(port, registry=registry)
        else:
            start_http_server(port)
    except OSError:
        return False
    return True
