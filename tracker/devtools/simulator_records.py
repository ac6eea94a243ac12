"""The simulator's tasks and the records it answers for them, shaped like AceData's.

A simulated task is a few facts fixed at creation (when, how long, how it ends);
its record is computed from them at request time, so a hundred thousand tasks
cost nothing until asked about. Over its `duration` a task goes through:

    no `response` yet                  the first 10 % of the duration, at most 2 s
    `response.state == "pending"`      until 25 % of the duration, at most 5 s
    `response.state == "processing"`   until the duration is over
    settled                            `completed` (with video and thumbnail) or
                                       `failed`; `finished_at` appears.
A `stall` task stays processing forever. Queueing is short and generating is
long, as with Luma, so a ten-minute task is soon seen running.

Keys and nesting follow AceData's documented examples (docs/simulator.md)
(`_id, id, api_id, application_id, created_at, credential_id, request,
trace_id, user_id, response, finished_at`). With `timing_fields`, records
also carry `started_at` (once there is a response) and `elapsed` (once
settled), which the vendor lists but its examples do not show.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from tracker.devtools.simulator_families import FAMILIES, FLAT

Outcome = Literal["completed", "failed", "stall"]
Settled = Literal["completed", "failed"]
Phase = Literal["no_response", "pending", "processing", "completed", "failed"]
PHASES: tuple[Phase, ...] = ("no_response", "pending", "processing", "completed", "failed")

# When a response appears and when it says processing: a share of the duration, capped.
RESPONSE_AFTER, RESPONSE_AFTER_CAP = 0.10, 2.0
PROCESSING_AFTER, PROCESSING_AFTER_CAP = 0.25, 5.0
CDN = "https://platform.cdn.acedata.cloud"
VIDEO_WIDTH, VIDEO_HEIGHT = 1360, 752
TRACE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "tracker-simulator/trace_id")
VIDEO_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "tracker-simulator/video_id")
FAILURE = {
    "code": "generation_failed",
    "message": "The video could not be generated from this prompt; try another prompt.",
}


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID string drawn from `rng`, so a seeded simulator repeats itself."""
    bits = (
        rng.getrandbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48) | (0x4000 << 64) | (0x8000 << 48)
    )
    hex_ = f"{bits:032x}"  # formatted by hand: uuid.UUID() is what made seeding slow
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"


@dataclass(frozen=True, slots=True)
class Account:
    """The ids AceData stamps on every record of one caller."""

    api_id: str
    application_id: str
    credential_id: str
    user_id: str

    @classmethod
    def draw(cls, rng: random.Random) -> Account:
        return cls(random_uuid(rng), random_uuid(rng), random_uuid(rng), random_uuid(rng))


@dataclass(slots=True)
class SimulatedTask:
    """One task: its record is a function of these facts and the time of asking."""

    id: str
    service: str
    object_id: str  # the record's `_id`, a MongoDB ObjectId in AceData's records
    created_at: float
    duration: float
    outcome: Outcome
    request: dict[str, Any]
    callback_url: str | None = None
    callback_sent: bool = False

    @property
    def trace_id(self) -> str:
        """The generation call's trace id, derived from the task id (cheap to seed)."""
        return str(uuid.uuid5(TRACE_NAMESPACE, self.id))

    @property
    def video_id(self) -> str:
        return str(uuid.uuid5(VIDEO_NAMESPACE, self.id))

    @property
    def started_after(self) -> float:
        """Seconds from creation until the record has a `response`."""
        return min(RESPONSE_AFTER * self.duration, RESPONSE_AFTER_CAP)

    @property
    def settled_at(self) -> float | None:
        """When the task settles (completed or failed); None for a stall."""
        return None if self.outcome == "stall" else self.created_at + self.duration

    def phase(self, now: float) -> Phase:
        """Where the task is at `now`."""
        elapsed = now - self.created_at
        if self.outcome != "stall" and elapsed >= self.duration:
            return self.outcome
        if elapsed < self.started_after:
            return "no_response"
        processing_after = min(PROCESSING_AFTER * self.duration, PROCESSING_AFTER_CAP)
        return "pending" if elapsed < processing_after else "processing"

    def finish(self, outcome: Settled, now: float) -> None:
        """Settle the task with `outcome` now."""
        self.outcome = outcome
        self.duration = max(0.0, now - self.created_at)


def build_record(
    task: SimulatedTask, account: Account, now: float, *, timing_fields: bool = False
) -> dict[str, Any]:
    """The task record AceData would answer for `task` at `now`."""
    record: dict[str, Any] = {
        "_id": task.object_id,
        "id": task.id,
        "api_id": account.api_id,
        "application_id": account.application_id,
        "created_at": round(task.created_at, 3),
        "credential_id": account.credential_id,
        "request": task.request,
        "trace_id": task.trace_id,
        "user_id": account.user_id,
    }
    phase = task.phase(now)
    shape = FAMILIES.get(task.service)
    if phase == "no_response":
        if shape is not None and task.service in FLAT:
            return shape(record, task, "pending", 0.0)
        return record
    started_at = task.created_at + task.started_after
    if timing_fields:
        record["started_at"] = round(started_at, 3)
    settled_at = task.settled_at
    if phase in ("completed", "failed") and settled_at is not None:
        record["finished_at"] = round(settled_at, 3)
        if timing_fields:
            record["elapsed"] = round(settled_at - started_at, 3)
    if shape is not None:
        share = (now - task.created_at) / task.duration if task.duration else 1.0
        return shape(record, task, phase, max(0.0, min(1.0, share)))
    record["response"] = _response(task, phase)
    if "finished_at" in record:  # keep the documented key order: response, then finished_at
        record["finished_at"] = record.pop("finished_at")
    return record


def _response(task: SimulatedTask, phase: Phase) -> dict[str, Any]:
    if phase in ("pending", "processing"):
        return {"success": True, "task_id": task.id, "state": phase}
    if phase == "failed":
        return {"success": False, "task_id": task.id, "state": "failed", "error": dict(FAILURE)}
    prompt = task.request.get("prompt")
    media = f"{CDN}/{task.service}/{task.id}"
    return {
        "success": True,
        "task_id": task.id,
        "video_id": task.video_id,
        "prompt": prompt if isinstance(prompt, str) else "",
        "video_url": f"{media}.mp4",
        "video_height": VIDEO_HEIGHT,
        "video_width": VIDEO_WIDTH,
        "state": "completed",
        "thumbnail_url": f"{media}.jpg",
        "thumbnail_width": VIDEO_WIDTH,
        "thumbnail_height": VIDEO_HEIGHT,
    }


def callback_body(task: SimulatedTask, phase: Phase) -> dict[str, Any]:
    """What AceData POSTs to a settled task's `callback_url`: the generation's result with
    `success`, `task_id` and `trace_id`, or its error."""
    if phase == "failed":
        return {
            "success": False,
            "task_id": task.id,
            "trace_id": task.trace_id,
            "error": dict(FAILURE),
        }
    return {**_response(task, phase), "trace_id": task.trace_id}


def error_body(code: str, message: str, trace_id: str) -> dict[str, Any]:
    """The vendor's error body."""
    return {"success": False, "error": {"code": code, "message": message}, "trace_id": trace_id}
