"""Prometheus metrics: counters kept by each process, gauges read from the database.

Workers count what they do (upstream requests, deliveries, latencies) and
serve them on TRACKER_METRICS_PORT. When processes share one host (`tracker up`,
`tracker demo`), PROMETHEUS_MULTIPROC_DIR is set for all of them and the API's
`/metrics` shows every process's counters together. Levels that live in the
database (tasks by state, outbox backlog) are read at scrape time, so they are
right whichever process answers.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
UPSTREAM_SHORT_ANSWERS = Counter(
    "tracker_upstream_short_answers_total",
    "retrieve_batch answers with fewer items than ids asked, whose missing ids were asked again.",
)
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


API_REQUESTS = Counter(
    "tracker_api_requests_total",
    "API requests by method, route template (never the raw path) and status.",
    ["method", "route", "status"],
)
API_LATENCY = Histogram(
    "tracker_api_request_seconds",
    "Duration of API requests by method, route template and status.",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
# Label values of a request that matched no route, and of a method outside HTTP's usual
# ones: a client must not be able to make new series (paths, methods) at will.
UNMATCHED_ROUTE = "unmatched"
OTHER_METHOD = "other"
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def observe_api_request(method: str, route: str | None, status: int, seconds: float) -> None:
    """Count and time one API request; `route` is the matched route's template, if any."""
    labels = (
        method if method in _KNOWN_METHODS else OTHER_METHOD,
        route or UNMATCHED_ROUTE,
        str(status),
    )
    API_REQUESTS.labels(*labels).inc()
    API_LATENCY.labels(*labels).observe(seconds)


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


def upstream_requests_by_outcome() -> dict[str, float]:
    """Upstream requests since the processes started, by outcome (`ok`, `too_many_requests`,
    ...): every process on this host with PROMETHEUS_MULTIPROC_DIR, else this one's."""
    registry: CollectorRegistry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    counts: dict[str, float] = {}
    for family in registry.collect():
        if family.name != "tracker_upstream_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                outcome = sample.labels.get("outcome", "")
                counts[outcome] = counts.get(outcome, 0.0) + sample.value
    return counts


def share_between_processes() -> Path:
    """Make this process and those it starts from now on keep their counters in one
    directory, merged by every `/metrics` (PROMETHEUS_MULTIPROC_DIR): the one set, else a
    fresh temporary one, removed when this process ends."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        return Path(configured)
    directory = tempfile.mkdtemp(prefix="tracker-metrics-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    return Path(directory)


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
