"""Normalising an upstream task record: what state, upstream word and failure it says.

Normalisation follows AceData's own SDK (`acedatacloud._runtime.tasks.task_status`),
which the tests use as an oracle: a status word outranks the `success` flag, a
done word without any artifact URL means the job ended without output (failed),
and a bare `success: false` is a transient hiccup that changes nothing. Pure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tracker.states import COMPLETED, FAILED, PENDING, RUNNING

# The word sets of AceData's SDK (docs/architecture.md#from-a-record-to-a-state).
DONE_WORDS = frozenset({"succeed", "succeeded", "success", "completed", "complete", "finished"})
FAILED_WORDS = frozenset({"failed", "failure", "error", "cancelled", "canceled", "rejected"})
PENDING_WORDS = frozenset({"pending", "queued", "submitted"})

_MAX_DEPTH = 6  # as deep as the SDK looks into a record


@dataclass(frozen=True)
class Failure:
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Observation:
    """What one upstream record says. `state` None: nothing to learn, leave the task as is."""

    state: str | None
    upstream_state: str | None = None
    failure: Failure | None = None


def _status_words(node: Any, depth: int = 0) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("state", "status") and isinstance(value, str):
                yield value.lower()
            else:
                yield from _status_words(value, depth + 1)
    elif isinstance(node, list):
        for item in node:
            yield from _status_words(item, depth + 1)


def _has_artifact_url(node: Any, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        return False
    if isinstance(node, dict):
        for key, value in node.items():
            if (
                isinstance(value, str)
                and value.startswith("http")
                and (key.endswith(("_url", "_urls")) or key == "url")
            ):
                return True
            if _has_artifact_url(value, depth + 1):
                return True
    elif isinstance(node, list):
        return any(_has_artifact_url(item, depth + 1) for item in node)
    return False


def upstream_failure(response: dict[str, Any], *, default_code: str = "upstream_failed") -> Failure:
    """The failure reason a response carries: `response.error` (`code`, `message`)."""
    error = response.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message") or error.get("detail")
        return Failure(
            code=str(code) if code else default_code,
            message=str(message) if message else "The upstream reported the task as failed.",
        )
    if isinstance(error, str) and error:
        return Failure(default_code, error)
    for key in ("message", "failure_reason", "fail_reason"):
        value = response.get(key)
        if isinstance(value, str) and value:
            return Failure(default_code, value)
    return Failure(default_code, "The upstream reported the task as failed.")


def normalise(record: dict[str, Any]) -> Observation:
    """Reduce an upstream task record to the tracker's state (docs/architecture.md)."""
    response = record.get("response")
    # Like the SDK, read the record itself where it has no `response`.
    source = record if response is None else response
    if not isinstance(source, dict):
        return Observation(RUNNING if response else PENDING)

    words = list(_status_words(source))
    if words:
        failed = next((w for w in words if w in FAILED_WORDS), None)
        if failed is not None:
            return Observation(FAILED, failed, upstream_failure(source))
        done = next((w for w in words if w in DONE_WORDS), None)
        if done is not None:
            if _has_artifact_url(source):
                return Observation(COMPLETED, done)
            return Observation(
                FAILED,
                done,
                Failure("no_output", f"The upstream reported {done!r} but returned no artifact."),
            )
        state = PENDING if all(w in PENDING_WORDS for w in words) else RUNNING
        return Observation(state, words[0])

    success = source.get("success")
    if success is False:
        error = source.get("error")
        if _has_artifact_url(source) or (isinstance(error, dict) and error.get("code")):
            return Observation(FAILED, None, upstream_failure(source))
    finished = source.get("finished_at") is not None or record.get("finished_at") is not None
    if finished:
        if success is True:
            return Observation(COMPLETED)
        if success is False:
            return Observation(FAILED, None, upstream_failure(source))
    if _has_artifact_url(source):
        return Observation(COMPLETED)
    if success is False:
        return Observation(None)  # a bare `success: false`: a transient hiccup
    if response is None or response == {}:
        return Observation(PENDING)
    return Observation(RUNNING)
