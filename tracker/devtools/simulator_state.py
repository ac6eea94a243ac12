"""The simulator's world: its knobs, its tasks and its counters, behind one lock.

Plain Python, no HTTP: `tracker.devtools.simulator` serves it. A request is first
`admit`ted (counted, checked against the token list and the rate budget, and
perhaps answered with an injected `Fault`), then served from the tasks.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tracker.devtools.simulator_callbacks import CallbackSender
from tracker.devtools.simulator_records import (
    PHASES,
    Account,
    Outcome,
    Settled,
    SimulatedTask,
    build_record,
    callback_body,
    random_uuid,
)

Share = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0)]


class SimulatorConfig(BaseModel):
    """The simulator's knobs; every one can change at run time (`PUT /_sim/config`)."""

    model_config = ConfigDict(extra="forbid")

    tokens: list[str] | None = Field(None, description="Accepted bearer tokens; None: any.")
    duration_min: Seconds = Field(5.0, description="Shortest task, seconds.")
    duration_max: Seconds = Field(20.0, description="Longest task, seconds.")
    failure_share: Share = Field(0.1, description="Share of new tasks that fail.")
    stall_share: Share = Field(0.0, description="Share of new tasks that never finish.")
    latency: Seconds = Field(0.0, description="Seconds added before every upstream answer.")
    error_429_share: Share = Field(0.0, description="Share of requests answered 429.")
    retry_after: Annotated[int, Field(ge=0)] | str = Field(
        1,
        description=(
            "Retry-After of injected 429s: seconds, or a string sent as it is, to play a "
            'misbehaving upstream ("inf", "1e400", "-5", an HTTP date years away, "soon").'
        ),
    )
    error_500_share: Share = Field(0.0, description="Share of requests answered 500.")
    malformed_share: Share = Field(0.0, description="Share answered 200 with a non-JSON body.")
    redirect_to: str | None = Field(None, description="Answer every request 307 to this URL.")
    batch_cap: int | None = Field(None, ge=0, description="Most items in one batch answer.")
    default_limit: int | None = Field(
        None,
        ge=0,
        description="Items a batch answer holds when its request names no `limit` (the vendor "
        "pages some task endpoints, e.g. 12); a request's `limit` is honoured always.",
    )
    drop_share: Share = Field(0.0, description="Share of batch items left out at random.")
    shuffle_batch: bool = Field(False, description="Answer batch items in random order.")
    rate_limit_rps: int | None = Field(
        None, ge=1, description="Requests per token per sliding second; more answer 429."
    )
    unknown_retrieve: Literal["empty", "404"] = Field(
        "empty", description="What retrieve answers for an unknown id: `{}` or a 404."
    )
    timing_fields: bool = Field(
        False, description="Add started_at and elapsed to records (docs/simulator.md)."
    )
    callback_drop_share: Share = Field(
        0.0, description="Share of `callback_url` POSTs not sent (a callback that never comes)."
    )
    seed: int | None = Field(None, description="Seed of every random choice, to repeat a run.")

    @field_validator("retry_after")
    @classmethod
    def _check_retry_after(cls, value: int | str) -> int | str:
        if isinstance(value, str) and not (value.isprintable() and value.isascii() and value):
            raise ValueError(f"must be printable ASCII to fit in a header (got {value!r})")
        return value

    @model_validator(mode="after")
    def _check_ranges(self) -> SimulatorConfig:
        if self.duration_min > self.duration_max:
            raise ValueError(
                f"duration_min {self.duration_min} is above duration_max {self.duration_max}"
            )
        if self.failure_share + self.stall_share > 1:
            raise ValueError("failure_share + stall_share cannot exceed 1")
        if self.error_429_share + self.error_500_share + self.malformed_share > 1:
            raise ValueError("error_429_share + error_500_share + malformed_share cannot exceed 1")
        return self


@dataclass(frozen=True)
class Fault:
    """An answer given instead of serving a request: a vendor error, a redirect or garbage."""

    kind: Literal["error", "redirect", "malformed"]
    status: int
    code: str = ""
    message: str = ""
    retry_after: int | str | None = None
    location: str | None = None


class TaskSeed(BaseModel):
    """One task to create through `POST /_sim/tasks`; omitted fields are drawn as for traffic."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    service: str = "luma"
    outcome: Outcome | None = None
    duration: Seconds | None = Field(None, description="Seconds to settle; 0: settled already.")
    prompt: str | None = None
    age: Seconds = Field(0.0, description="Seconds since the task was created, e.g. 10: running.")
    callback_url: str | None = Field(
        None, description="Called back when the task settles, as a generation request's."
    )


class SimulatorState:
    """Tasks, knobs and counters of one simulator; every public method takes the lock."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.lock = threading.Lock()
        self.initial_config = config
        self.epoch = 0
        self.callbacks = CallbackSender(self._callback_due, self._count_callback)
        self.clear(config)

    def clear(self, config: SimulatorConfig) -> None:
        """Forget every task and counter; run with `config` from now on."""
        self.callbacks.forget()
        with self.lock:
            # Requests still in flight across a reset must not count in the new epoch.
            self.epoch += 1
            self.callback_counts: Counter[str] = Counter()
            self.config = config
            self.rng = random.Random(config.seed)
            self.account = Account.draw(self.rng)
            self.tasks: dict[str, SimulatedTask] = {}
            self.by_action: Counter[str] = Counter()
            self.by_status: Counter[int] = Counter()
            self.batch_calls = 0
            self.items_requested = 0
            self.items_answered = 0
            self.over_budget = 0
            self.max_rate = 0
            self.arrivals: deque[float] = deque()
            self.budget_windows: dict[str, deque[float]] = {}

    def reconfigure(self, changes: dict[str, Any]) -> SimulatorConfig:
        """Change the knobs named in `changes`; raises pydantic's ValidationError."""
        with self.lock:
            config = SimulatorConfig.model_validate({**self.config.model_dump(), **changes})
            if "seed" in changes:
                self.rng = random.Random(config.seed)
            self.config = config
            return config

    def seed(self, seeds: list[TaskSeed]) -> list[str]:
        """Create tasks as the seeds say; their ids."""
        with self.lock:
            tasks = [self._create(seed.service, _seed_request(seed), seed) for seed in seeds]
            for task, seed in zip(tasks, seeds, strict=True):
                task.callback_url = seed.callback_url
            calling_back = [
                (task.id, task.settled_at)
                for task in tasks
                if task.callback_url is not None and task.settled_at is not None
            ]
        for task_id, settled_at in calling_back:
            assert settled_at is not None
            self.callbacks.schedule(task_id, settled_at)
        return [task.id for task in tasks]

    def generate(self, service: str, request: dict[str, Any]) -> SimulatedTask:
        """A task created by a generation call with body `request`; one with a `callback_url`
        calls it back when it settles."""
        with self.lock:
            task = self._create(service, request, TaskSeed(service=service))
            callback_url = request.get("callback_url")
            if isinstance(callback_url, str) and callback_url.startswith(("http://", "https://")):
                task.callback_url = callback_url
            settled_at = task.settled_at
        if task.callback_url is not None and settled_at is not None:
            self.callbacks.schedule(task.id, settled_at)
        return task

    def _callback_due(self, task_id: str) -> tuple[float, dict[str, Any], str] | None:
        """(when it settles, the callback's body, its URL) of a task to call back, once."""
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None or task.callback_url is None or task.callback_sent:
                return None
            settled_at = task.settled_at
            if settled_at is None:
                return None
            now = time.time()
            if settled_at > now:
                return settled_at, {}, task.callback_url
            task.callback_sent = True
            if self.rng.random() < self.config.callback_drop_share:
                self.callback_counts["callbacks_dropped"] += 1
                return None
            return settled_at, callback_body(task, task.phase(now)), task.callback_url

    def _count_callback(self, outcome: str) -> None:
        with self.lock:
            self.callback_counts[outcome] += 1

    def _create(self, service: str, request: dict[str, Any], seed: TaskSeed) -> SimulatedTask:
        config, rng = self.config, self.rng
        outcome = seed.outcome
        if outcome is None:
            draw = rng.random()
            stalls = draw < config.stall_share
            fails = draw < config.stall_share + config.failure_share
            outcome = "stall" if stalls else "failed" if fails else "completed"
        duration = seed.duration
        if duration is None:
            duration = rng.uniform(config.duration_min, config.duration_max)
        created_at = time.time() - seed.age
        task = SimulatedTask(
            id=seed.id or random_uuid(rng),
            service=service,
            object_id=f"{int(created_at):08x}{rng.getrandbits(64):016x}",
            created_at=created_at,
            duration=duration,
            outcome=outcome,
            request=request,
        )
        self.tasks[task.id] = task
        return task

    def admit(self, token: str | None, action: str) -> Fault | None:
        """Count an upstream request; the fault to answer instead of serving it, if any."""
        with self.lock:
            config, now = self.config, time.monotonic()
            self.by_action[action] += 1
            _slide(self.arrivals, now)
            self.arrivals.append(now)
            self.max_rate = max(self.max_rate, len(self.arrivals))
            if config.tokens is not None and token not in config.tokens:
                return Fault("error", 401, "invalid_token", "The token is missing or invalid.")
            if config.rate_limit_rps is not None:
                window = self.budget_windows.setdefault(token or "", deque())
                _slide(window, now)
                if len(window) >= config.rate_limit_rps:
                    self.over_budget += 1
                    wait = max(1, math.ceil(window[0] + 1.0 - now))
                    return Fault("error", 429, "too_many_requests", "Rate limit exceeded.", wait)
                window.append(now)
            return self._injected_fault(config)

    def _injected_fault(self, config: SimulatorConfig) -> Fault | None:
        if config.redirect_to is not None:
            return Fault("redirect", 307, location=config.redirect_to)
        draw = self.rng.random()
        if draw < config.error_429_share:
            return Fault(
                "error", 429, "too_many_requests", "Too many requests.", config.retry_after
            )
        draw -= config.error_429_share
        if draw < config.error_500_share:
            return Fault("error", 500, "api_error", "fetch failed")
        draw -= config.error_500_share
        if draw < config.malformed_share:
            return Fault("malformed", 200)
        return None

    def count_status(self, status: int, epoch: int) -> None:
        """Count an answer's status, unless a reset happened since its request arrived."""
        with self.lock:
            if epoch == self.epoch:
                self.by_status[status] += 1

    def records(
        self, service: str, ids: list[str], *, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The batch answer's items: known ids of this service, after drops, shuffle, the
        request's `limit` (or the default one) and the cap."""
        with self.lock:
            config, now = self.config, time.time()
            found = [self.tasks.get(task_id) for task_id in dict.fromkeys(ids)]
            tasks = [t for t in found if t is not None and t.service == service]
            tasks = [t for t in tasks if self.rng.random() >= config.drop_share]
            if config.shuffle_batch:
                self.rng.shuffle(tasks)
            page = limit if limit is not None else config.default_limit
            if page is not None:
                tasks = tasks[:page]
            if config.batch_cap is not None:
                tasks = tasks[: config.batch_cap]
            self.batch_calls += 1
            self.items_requested += len(ids)
            self.items_answered += len(tasks)
            return [
                build_record(t, self.account, now, timing_fields=config.timing_fields)
                for t in tasks
            ]

    def record(self, service: str, task_id: str) -> dict[str, Any] | None:
        """The record of one task of `service`, or None if there is no such task."""
        with self.lock:
            self.items_requested += 1
            task = self.tasks.get(task_id)
            if task is None or task.service != service:
                return None
            self.items_answered += 1
            return build_record(
                task, self.account, time.time(), timing_fields=self.config.timing_fields
            )

    def stats(self) -> dict[str, Any]:
        """The counters `GET /_sim/stats` shows."""
        with self.lock:
            now = time.time()
            phases = Counter(task.phase(now) for task in self.tasks.values())
            return {
                "requests": sum(self.by_action.values()),
                "requests_by_action": dict(self.by_action),
                "requests_by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "retrieve_batch_calls": self.batch_calls,
                "items_requested": self.items_requested,
                "items_answered": self.items_answered,
                "over_budget": self.over_budget,
                "max_rate_per_second": self.max_rate,
                "tasks": len(self.tasks),
                "callbacks_sent": self.callback_counts["callbacks_sent"],
                "callbacks_failed": self.callback_counts["callbacks_failed"],
                "callbacks_dropped": self.callback_counts["callbacks_dropped"],
                "tasks_by_phase": {phase: phases[phase] for phase in PHASES},
            }

    def task_views(self) -> list[dict[str, Any]]:
        """Every task as the admin routes show it: phase and the moment it settled."""
        with self.lock:
            now = time.time()
            return [_view(task, now) for task in self.tasks.values()]

    def task_view(self, task_id: str) -> dict[str, Any] | None:
        """One task as the admin routes show it, with its current record."""
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                return None
            now = time.time()
            record = build_record(task, self.account, now, timing_fields=self.config.timing_fields)
            return {**_view(task, now), "record": record}

    def finish(self, task_id: str, outcome: Settled) -> dict[str, Any] | None:
        """Settle a task now; its view, or None if there is no such task."""
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None:
                return None
            now = time.time()
            task.finish(outcome, now)
            view = _view(task, now)
            calls_back = task.callback_url is not None and not task.callback_sent
        if calls_back:
            self.callbacks.schedule(task_id, now)
        return view


def _seed_request(seed: TaskSeed) -> dict[str, Any]:
    return {"action": "generate", "prompt": seed.prompt or "A cat surfing a wave"}


def _view(task: SimulatedTask, now: float) -> dict[str, Any]:
    settled_at = task.settled_at
    return {
        "id": task.id,
        "service": task.service,
        "outcome": task.outcome,
        "phase": task.phase(now),
        "created_at": task.created_at,
        "settled_at": settled_at if settled_at is not None and settled_at <= now else None,
    }


def _slide(window: deque[float], now: float) -> None:
    """Drop moments older than one second."""
    while window and window[0] <= now - 1.0:
        window.popleft()
