"""Fault injection: the whole tracker on private services, broken on purpose, then checked.

    rig = FaultRig(workdir, simulator)            # private PostgreSQL and Redis, a receiver
    expected = rig.seed(300, spread=8)            # simulator tasks: {upstream id: true state}
    rig.register(list(expected))                  # tracked, with the receiver as callback
    rig.start(workers=2, beats=1)                 # real `tracker worker` / `tracker beat`
    rig.kill_worker(); rig.redis.restart(); rig.postgres.restart(); rig.receiver.down() ...
    figures = rig.settle_and_check(expected)      # the invariants, or AssertionError
    rig.close()

The private PostgreSQL (`initdb` + `pg_ctl` in a temporary folder, a free port)
and Redis (`redis-server --port N`, nothing saved) can be stopped and restarted
without touching the shared services the rest of the suite uses. PostgreSQL
refuses to run as root: as root, its commands run as the `postgres` user
(`runuser`), or `nobody` where there is none.

The invariants (issue #8), checked by `check_invariants`:

- every registered task is terminal, in the state the simulator says is true;
- every terminal event has exactly one delivery row, `succeeded`, whose
  webhook-id the receiver acknowledged (answered 2xx before the sender's timeout,
  and read by the sender: an answer written into the socket of a sender being
  killed is reset unread, and its re-send is a retry);
- duplicates (a webhook-id received again after it was acknowledged) stay under
  1 % of deliveries; re-sends of an id whose earlier requests were refused,
  failed or answered too late are retries, counted apart;
- no delivery and no task is left claimed (a lease) or pending;
- each task's transitions form one legal chain from `pending` to its state,
  with no repeated and no missing step.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from tests.support.processes import TrackerProcesses, wait_until
from tests.support.receiver import Received, Receiver, Reply
from tests.support.sim import SimulatorHandle
from tracker.config import load_settings
from tracker.db import migrate
from tracker.db.engine import make_engine
from tracker.db.models import Task, TaskTransition, WebhookAttempt, WebhookDelivery
from tracker.devtools.demo import free_port
from tracker.states import (
    DELIVERY_SUCCEEDED,
    EVENT_FOR_STATE,
    TERMINAL_STATES,
    can_transition,
)
from tracker.tracking.clients import NewClient, create_client
from tracker.tracking.registration import register_task
from tracker.tracking.schemas import TaskRegistration

MAX_DUPLICATE_SHARE = 0.01
UPSTREAM_TOKEN = "fault-token-0123456789abcdef"

# Every duration shrunk so that a scenario takes seconds, with the shapes kept:
# leases of 4-8 s, retries every 1-2 s for about a minute, a 2 s webhook timeout, a
# circuit breaker that probes every 2 s once open.
FAST_ENV = {
    "TRACKER_POLL_INTERVAL": "1",
    "TRACKER_MAX_POLL_INTERVAL": "2",
    "TRACKER_SWEEP_INTERVAL": "1",
    "TRACKER_POLL_LEASE": "4",
    "TRACKER_DELIVERY_LEASE": "8",
    "TRACKER_WEBHOOK_TIMEOUT": "2",
    "TRACKER_WEBHOOK_RETRY_SCHEDULE": ",".join(["0", "1", "1"] + ["2"] * 40),
    "TRACKER_DESTINATION_PROBE": "2",
    "TRACKER_UPSTREAM_TIMEOUT": "5",
    "TRACKER_UPSTREAM_RPS": "50",
    "TRACKER_WEBHOOK_ALLOW_PRIVATE": "true",
    "TRACKER_METRICS_PORT": "0",
    "TRACKER_LOG_FORMAT": "json",
    "TRACKER_LOG_LEVEL": "INFO",
}


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, check=True, capture_output=True, timeout=60, **kwargs)


def _postgres_user() -> pwd.struct_passwd | None:
    """Whom PostgreSQL runs as: ourselves (None), or an unprivileged user when we are root."""
    if os.getuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and no `postgres` or `nobody` user to run PostgreSQL as")


class PrivatePostgres:
    """A PostgreSQL server of our own in a temporary folder, on a free port."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is needed on PATH for the fault tests")
        self.port = free_port()
        # Not under pytest's tmp_path: its parents are private to us, and the server may be
        # another user.
        self.dir = Path(tempfile.mkdtemp(prefix="tracker-faults-pg-"))
        self.data = self.dir / "data"
        self._user = _postgres_user()
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        self._pg(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E",
            "UTF8",
        )  # fmt: skip
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.start()

    def _pg(self, *argv: str) -> None:
        prefix = ["runuser", "-u", self._user.pw_name, "--"] if self._user is not None else []
        _run([*prefix, *argv], cwd=self.dir)

    def _ctl(self, action: str, *extra: str) -> None:
        # fsync and full-page writes guard against the machine crashing, which no test
        # does. synchronous_commit stays on: an immediate stop is a crash of the server,
        # and an asynchronous commit acknowledged just before it would be lost with it,
        # as no production database loses it (a webhook recorded as answered, then sent
        # again).
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        self._pg(
            "pg_ctl", action, "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"),
            "-w", "-t", "60", *extra,
        )  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; `fast` and `immediate` drop every connection at once."""
        self._ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self._ctl("restart", "-m", mode)

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server of our own on a free port that keeps nothing across a restart."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is needed on PATH for the fault tests")
        self.port = free_port()
        self.dir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        _run(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "yes", "--dir", str(self.dir),
                "--pidfile", str(self.dir / f"redis-{self.port}.pid"),
                "--logfile", str(self.dir / f"redis-{self.port}.log"),
            ]
        )  # fmt: skip
        wait_until(self._answers, timeout=10, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """Shut down without saving: every queued message is gone."""
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
            check=False,
            capture_output=True,
            timeout=30,
        )
        wait_until(lambda: not self._answers(), timeout=10, what="redis-server to stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()


class FaultReceiver:
    """A webhook receiver on a fixed port that can go down, turn slow and come back.

    It keeps every request across restarts. A request counts as acknowledged when
    it was answered 2xx sooner than `ack_within` (the sender's timeout) to a sender
    still there to read it (a killed sender's request is not answered) and that read
    it (`Received.unread`).
    """

    def __init__(self, *, ack_within: float, delay: float = 0.0) -> None:
        self.ack_within = ack_within
        self._server: Receiver | None = Receiver()
        self._server.default_reply = self._usual(delay)
        self.port = self._server.port
        self._past: list[Received] = []

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def down(self) -> None:
        """Close the port: connections are refused until `up`."""
        if self._server is not None:
            self._server.close()
            self._past += self._server.requests
            self._server = None

    def up(self, *, delay: float = 0.0) -> None:
        """Listen again (or stay up), answering 200 after `delay` seconds."""
        server = self._server or wait_until(self._listen, timeout=10, what="the receiver's port")
        assert server is not None  # wait_until returns only what is truthy
        server.default_reply = Reply(delay=delay)
        self._server = server

    @staticmethod
    def _usual(delay: float) -> Reply:
        """The usual answer: 200 after about `delay` seconds, varying by half of it either way
        from request to request as a real receiver's time does. (Answers in step to the
        millisecond make each batch's answers arrive in one lump, and a SIGKILL landing in
        the milliseconds before their record loses all of them at once.)"""
        return Reply(delay=delay, jitter=delay / 2)

    def _listen(self) -> Receiver | None:
        try:
            return Receiver(port=self.port)
        except OSError:  # the port is not free yet
            return None

    @property
    def requests(self) -> list[Received]:
        current = list(self._server.requests) if self._server is not None else []
        return self._past + current

    def acknowledged(self, request: Received) -> bool:
        """Answered 2xx in time, and read by the sender: an answer written while the
        sender's process was being killed reached nobody, and its re-send is a retry."""
        reply = request.reply
        return (
            reply is not None
            and 200 <= reply.status < 300
            and bool(request.answered)
            and request.answered[0] - request.at < self.ack_within
            and not request.unread
        )

    def close(self) -> None:
        self.down()


@dataclass
class Figures:
    """What one run came to; `violations` lists every broken invariant (empty: all held)."""

    tasks: int = 0
    terminal: int = 0
    states: Counter[str] = field(default_factory=Counter)
    deliveries: int = 0
    webhooks_acknowledged: int = 0
    requests_received: int = 0
    duplicates: int = 0
    retries_received: int = 0
    stuck: int = 0
    transitions_checked: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    # (webhook-id, when its first acknowledgement was written, when it came again),
    # time.monotonic(): set beside the SIGKILLs, it shows how long the sender had to record it.
    duplicate_receipts: list[tuple[str, float, float]] = field(default_factory=list)
    # Per succeeded delivery, seconds from the receiver's answer to its record in the database:
    # a worker killed inside that window makes the webhook a duplicate.
    record_lags: list[float] = field(default_factory=list)

    @property
    def duplicate_share(self) -> float:
        return self.duplicates / self.deliveries if self.deliveries else 0.0

    def _lags(self) -> str:
        if not self.record_lags:
            return "-"
        lags = sorted(self.record_lags)
        p50, p99 = (lags[min(len(lags) - 1, int(q * len(lags)))] for q in (0.5, 0.99))
        return f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms"

    def summary(self) -> str:
        faults = ", ".join(f"{name} {n}" for name, n in sorted(self.faults.items())) or "none"
        states = ", ".join(f"{name} {n}" for name, n in sorted(self.states.items()))
        return "\n".join(
            [
                f"tasks                 {self.tasks} ({states})",
                f"terminal              {self.terminal}",
                f"deliveries            {self.deliveries}",
                f"webhooks acknowledged {self.webhooks_acknowledged}",
                f"requests received     {self.requests_received}",
                f"duplicates            {self.duplicates} ({self.duplicate_share:.2%})",
                f"answer to record      {self._lags()}",
                f"retries received      {self.retries_received} (after a refusal, an error "
                "or a late answer)",
                f"stuck                 {self.stuck}",
                f"transitions checked   {self.transitions_checked}",
                f"faults injected       {faults}",
                f"violations            {len(self.violations)}",
            ]
        )


def check_invariants(
    engine: Engine,
    expected: Mapping[str, str],
    receiver: FaultReceiver,
    *,
    accepted: Iterable[str] | None = None,
    webhook_secret: str | None = None,
) -> Figures:
    """Check every invariant of the module docstring over the database and the receiver.

    `expected` maps every upstream id the run may have registered to its true
    terminal state; `accepted` (default: all of them) must be tracked.
    """
    figures = Figures()
    problems = figures.violations
    with Session(engine) as session:
        tasks = session.execute(select(Task.id, Task.task_id, Task.state, Task.claimed_until)).all()
        deliveries = session.execute(
            select(
                WebhookDelivery.id,
                WebhookDelivery.task_row_id,
                WebhookDelivery.event,
                WebhookDelivery.status,
                WebhookDelivery.claimed_until,
            )
        ).all()
        answered = session.execute(
            select(
                WebhookDelivery.delivered_at,
                WebhookAttempt.started_at,
                WebhookAttempt.duration_ms,
            )
            .join(WebhookAttempt, WebhookAttempt.delivery_id == WebhookDelivery.id)
            .where(
                WebhookDelivery.status == DELIVERY_SUCCEEDED,
                WebhookAttempt.attempt == WebhookDelivery.attempts,
            )
        ).all()
        transitions = session.execute(
            select(
                TaskTransition.task_row_id, TaskTransition.from_state, TaskTransition.to_state
            ).order_by(TaskTransition.id)
        ).all()

    figures.tasks = len(tasks)
    figures.record_lags = [
        (row.delivered_at - row.started_at).total_seconds() - row.duration_ms / 1000
        for row in answered
    ]
    figures.deliveries = len(deliveries)
    by_row = {row.id: row for row in tasks}
    seen_ids = {row.task_id for row in tasks}
    must_track = set(expected if accepted is None else accepted)
    for task_id in must_track - seen_ids:
        problems.append(f"task {task_id}: accepted but not tracked")

    # States against the simulator's truth; leases given back.
    for row in tasks:
        figures.states[row.state] += 1
        if row.state in TERMINAL_STATES:
            figures.terminal += 1
        else:
            problems.append(f"task {row.task_id}: not terminal ({row.state})")
        truth = expected.get(row.task_id)
        if truth is None:
            problems.append(f"task {row.task_id}: tracked but never registered by the test")
        elif row.state != truth:
            problems.append(f"task {row.task_id}: {row.state}, the upstream says {truth}")
        if row.claimed_until is not None and row.state in TERMINAL_STATES:
            figures.stuck += 1
            problems.append(f"task {row.task_id}: terminal yet still claimed")

    # One succeeded delivery per terminal event, acknowledged by the receiver.
    received: defaultdict[str, list[Received]] = defaultdict(list)
    for request in receiver.requests:
        received[request.headers.get("webhook-id", "?")].append(request)
    figures.requests_received = sum(len(r) for r in received.values())
    per_event: defaultdict[tuple[int, str], list[Any]] = defaultdict(list)
    for delivery in deliveries:
        per_event[(delivery.task_row_id, delivery.event)].append(delivery)
        if delivery.claimed_until is not None or delivery.status == "pending":
            figures.stuck += 1
            problems.append(
                f"delivery {delivery.id}: {delivery.status}, claimed until {delivery.claimed_until}"
            )
    verifier = Webhook(webhook_secret) if webhook_secret else None
    for row in tasks:
        event = EVENT_FOR_STATE.get(row.state)
        if row.state not in TERMINAL_STATES or event is None:
            continue
        rows = per_event.get((row.id, event), [])
        if len(rows) != 1:
            problems.append(f"task {row.task_id}: {len(rows)} deliveries of {event}")
            continue
        delivery = rows[0]
        if delivery.status != DELIVERY_SUCCEEDED:
            problems.append(f"task {row.task_id}: delivery {delivery.id} is {delivery.status}")
        acked = [r for r in received.get(delivery.id, []) if receiver.acknowledged(r)]
        if not acked:
            problems.append(f"task {row.task_id}: webhook {delivery.id} never acknowledged")
            continue
        figures.webhooks_acknowledged += 1
        body = json.loads(acked[0].body)
        if body["type"] != event or body["data"]["state"] != row.state:
            problems.append(f"task {row.task_id}: webhook {delivery.id} says {body}")
        if verifier is not None and not _signed_by(verifier, acked[0]):
            problems.append(f"webhook {delivery.id}: the signature does not verify")

    delivery_ids = {delivery.id for delivery in deliveries}
    for webhook_id, requests_of_id in received.items():
        if webhook_id not in delivery_ids:
            problems.append(f"webhook-id {webhook_id} received but no such delivery")
        first_ack = next(
            (n for n, r in enumerate(requests_of_id) if receiver.acknowledged(r)), None
        )
        before = len(requests_of_id) if first_ack is None else first_ack
        figures.retries_received += before
        if first_ack is not None:
            figures.duplicates += len(requests_of_id) - first_ack - 1
            figures.duplicate_receipts += [
                (webhook_id, requests_of_id[first_ack].answered[0], again.at)
                for again in requests_of_id[first_ack + 1 :]
            ]
    if figures.duplicate_share >= MAX_DUPLICATE_SHARE:
        problems.append(
            f"{figures.duplicates} duplicates in {figures.deliveries} deliveries "
            f"({figures.duplicate_share:.2%}, the limit is {MAX_DUPLICATE_SHARE:.0%})"
        )

    # Histories: one legal chain per task, from pending to the task's state.
    paths: defaultdict[int, list[tuple[str | None, str]]] = defaultdict(list)
    for row_id, from_state, to_state in transitions:
        paths[row_id].append((from_state, to_state))
        figures.transitions_checked += 1
    for row in tasks:
        path = paths.get(row.id, [])
        if not path or path[0] != (None, "pending"):
            problems.append(f"task {row.task_id}: history does not start at pending: {path}")
            continue
        for (_, previous), (from_state, to_state) in itertools.pairwise(path):
            if from_state != previous or not can_transition(previous, to_state):
                problems.append(f"task {row.task_id}: broken history {path}")
                break
        if path[-1][1] != row.state:
            problems.append(f"task {row.task_id}: history ends at {path[-1][1]}, not {row.state}")
    for row_id in set(paths) - set(by_row):
        problems.append(f"transitions of task row {row_id}, which does not exist")
    return figures


def _signed_by(verifier: Webhook, request: Received) -> bool:
    """Whether a request carries the signature of its id, timestamp and body.

    Checked against its own timestamp: `Webhook.verify` would also refuse, rightly for
    a receiver, a webhook sent more than 5 minutes before the check runs.
    """
    headers = request.headers
    sent_at = datetime.fromtimestamp(int(headers.get("webhook-timestamp", "0")), tz=UTC)
    expected = verifier.sign(headers.get("webhook-id", ""), sent_at, request.body.decode())
    return expected in headers.get("webhook-signature", "").split()


class FaultRig:
    """The tracker on private PostgreSQL and Redis, with the simulator and a receiver.

    `env` overrides FAST_ENV. Faults are counted in `faults` for the report.
    """

    def __init__(
        self,
        workdir: Path,
        simulator: SimulatorHandle,
        *,
        env: Mapping[str, str] | None = None,
        receiver_delay: float = 0.0,  # about: see `FaultReceiver._usual`
    ) -> None:
        self.workdir = workdir
        self.simulator = simulator
        self.faults: Counter[str] = Counter()
        self.fault_log: list[tuple[float, str]] = []  # (time.monotonic(), fault)
        self.rng = random.Random(8)
        self.started = time.monotonic()
        self._lock = threading.RLock()
        self._closers: list[Any] = []
        try:
            self.postgres = PrivatePostgres()
            self._closers.append(self.postgres.close)
            migrate.upgrade(self.postgres.url)
            self.redis = PrivateRedis(workdir)
            self._closers.append(self.redis.close)
            self.env = {
                **FAST_ENV,
                "TRACKER_DATABASE_URL": self.postgres.url,
                "TRACKER_BROKER_URL": self.redis.url,
                "TRACKER_UPSTREAM_URL": simulator.url,
                "TRACKER_UPSTREAM_TOKEN": UPSTREAM_TOKEN,
                "TRACKER_API_PORT": str(free_port()),
                **(env or {}),
            }
            self.receiver = FaultReceiver(
                ack_within=float(self.env["TRACKER_WEBHOOK_TIMEOUT"]), delay=receiver_delay
            )
            self._closers.append(self.receiver.close)
            self.processes = TrackerProcesses(self.env, workdir)
            self._closers.append(self._kill_all)
            self.engine = make_engine(self.postgres.url, pool_pre_ping=True)
            self._closers.append(self.engine.dispose)
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                self.owner: NewClient = create_client(session, "faults")
        except BaseException:
            self.close()
            raise

    def fault(self, name: str) -> None:
        """Count a fault and note when it happened."""
        self.faults[name] += 1
        self.fault_log.append((time.monotonic(), name))

    def timeline(self, figures: Figures) -> str:
        """Faults and duplicates in time order, in seconds since the rig started; a duplicate
        stands where its first 2xx answer was written, beside the fault that lost it."""
        events = [(at, f"fault: {name}") for at, name in self.fault_log]
        events += [
            (first, f"{webhook_id} answered 2xx, received again at {again - self.started:.3f} s")
            for webhook_id, first, again in figures.duplicate_receipts
        ]
        return "\n".join(f"{at - self.started:8.3f} s  {what}" for at, what in sorted(events))

    # The system's parts.

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.env['TRACKER_API_PORT']}"

    def start(self, *, workers: int = 1, beats: int = 1, api: bool = False) -> None:
        for _ in range(workers):
            self.processes.worker()
        for _ in range(beats):
            self.processes.beat()
        if api:
            self.start_api()

    def start_api(self) -> None:
        self._start_role("api")

    def _api_answers(self) -> bool:
        try:
            return requests.get(f"{self.api_url}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def running(self, role: str) -> list[str]:
        with self._lock:
            names = list(self.processes.children)
        return [name for name in names if name == role or name.startswith(f"{role}-")]

    def kill(self, role: str, *, restart: bool = True) -> None:
        """SIGKILL one running process of `role` (worker, beat, api), then start another."""
        with self._lock:  # faults may come from several threads
            victims = self.running(role)
            if victims:
                self.fault(f"{role} SIGKILL")  # noted as it is sent: reaping it can lag
                self.processes.kill(self.rng.choice(victims), signal.SIGKILL)
            if restart:
                self._start_role(role, wait=False)
        if restart and role == "api":  # outside the lock: other faults go on meanwhile
            wait_until(self._api_answers, timeout=60, what="the API")

    def restart_all(self, **env: str) -> None:
        """Stop every process and start the same roles again with `env` changed."""
        with self._lock:  # no fault thread kills a process meanwhile
            roles = [name.rsplit("-", 1)[0] for name in self.processes.children]
            self.processes.stop_all()
            self.env.update(env)
            self.processes.env.update(env)
            for role in roles:
                self._start_role(role)

    def _start_role(self, role: str, *, wait: bool = True) -> None:
        if role == "api":
            self.processes.start("api", name="api")
            if wait:
                wait_until(self._api_answers, timeout=60, what="the API")
        elif role == "worker":
            self.processes.worker()
        else:
            self.processes.start(role)

    # Tasks.

    def seed(
        self, count: int, *, spread: float, failed_share: float = 0.3, start: float = 0.0
    ) -> dict[str, str]:
        """`count` simulator tasks settling within `start`..`start + spread` s: {id: truth}."""
        outcomes = [
            "failed" if self.rng.random() < failed_share else "completed" for _ in range(count)
        ]
        ids = self.simulator.seed(
            [
                {"outcome": outcome, "duration": start + self.rng.uniform(0, spread)}
                for outcome in outcomes
            ]
        )
        return dict(zip(ids, outcomes, strict=True))

    def register(self, ids: Iterable[str]) -> None:
        """Register ids in-process, straight into the database, with the receiver as callback."""
        settings = load_settings(database_url=self.postgres.url, _env_file=None)
        with Session(self.engine) as session, session.begin():
            owner = session.merge(self.owner.client)
            for task_id in ids:
                register_task(
                    session,
                    owner,
                    TaskRegistration(task_id=task_id, callback_url=self.receiver.url()),
                    settings=settings,
                )

    def register_through_api(self, ids: list[str], *, timeout: float = 10) -> list[str]:
        """Register ids with one batch call; the ids the API accepted (answered 2xx each)."""
        body = {"tasks": [{"task_id": i, "callback_url": self.receiver.url()} for i in ids]}
        headers = {"authorization": f"Bearer {self.owner.api_key}"}
        try:
            answer = requests.post(
                f"{self.api_url}/v1/tasks/batch", json=body, headers=headers, timeout=timeout
            )
        except requests.RequestException:
            self.fault("API unreachable")
            return []
        if answer.status_code >= 500:
            self.fault(f"API answered {answer.status_code}")
        if answer.status_code != 200:
            return []
        items = answer.json()["items"]
        return [i for i, item in zip(ids, items, strict=True) if 200 <= item["status"] < 300]

    # The end.

    def settled(self, expected: Iterable[str]) -> bool:
        """Every task terminal and every delivery done and acknowledged (cheap check)."""
        try:
            with Session(self.engine) as session:
                states = session.scalars(select(Task.state)).all()
                open_deliveries = session.scalar(
                    select(WebhookDelivery.id)
                    .where(
                        (WebhookDelivery.status == "pending")
                        | WebhookDelivery.claimed_until.is_not(None)
                    )
                    .limit(1)
                )
                succeeded = set(
                    session.scalars(
                        select(WebhookDelivery.id).where(
                            WebhookDelivery.status == DELIVERY_SUCCEEDED
                        )
                    )
                )
        except Exception:
            return False
        if len(states) < len(set(expected)) or any(s not in TERMINAL_STATES for s in states):
            return False
        acked = {
            r.headers.get("webhook-id")
            for r in self.receiver.requests
            if self.receiver.acknowledged(r)
        }
        return open_deliveries is None and succeeded <= acked

    def settle_and_check(
        self,
        expected: Mapping[str, str],
        *,
        accepted: Iterable[str] | None = None,
        timeout: float = 90,
    ) -> Figures:
        """Wait for the system to settle, then check the invariants; AssertionError if broken."""
        must_track = list(expected if accepted is None else accepted)
        deadline = time.monotonic() + timeout
        while not self.settled(must_track) and time.monotonic() < deadline:
            time.sleep(0.5)
        figures = check_invariants(
            self.engine,
            expected,
            self.receiver,
            accepted=must_track,
            webhook_secret=self.owner.webhook_secret,
        )
        figures.faults = self.faults
        if figures.violations:
            shown = "\n  ".join(figures.violations[:30])
            raise AssertionError(
                f"{len(figures.violations)} invariants broken:\n  {shown}\n"
                f"{figures.summary()}\n{self.timeline(figures)}\n{self.processes.logs(tail=25)}"
            )
        return figures

    def _kill_all(self) -> None:
        """SIGKILL every process: the run is over, nothing needs a graceful stop."""
        with self._lock:
            for name in list(self.processes.children):
                self.processes.kill(name, signal.SIGKILL)

    def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        self._closers.clear()


class Repeating:
    """Call `action` every `every` seconds, give or take `jitter` of it, on a background
    thread until stopped.

    The pauses are random so that the faults fall at any moment: at a fixed period they
    lock onto the phase of beat's 1-s tick (a period of 2.5 s hits every other tick at
    the same point), and a scenario then keeps killing a worker at the moment its
    webhooks' answers come in, which no crash in the field aims for.
    """

    def __init__(self, every: float, action: Any, *, jitter: float = 0.3) -> None:
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        pauses = random.Random()  # not seeded: each run meets other moments

        def loop() -> None:
            while not self._stop.wait(every * pauses.uniform(1 - jitter, 1 + jitter)):
                try:
                    action()
                except BaseException as exc:
                    self._errors.append(exc)
                    return

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        if self._errors:
            raise self._errors[0]
