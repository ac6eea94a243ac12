"""Normalising an upstream task record: what state, upstream word, failure and progress it says.

The service's profile (`tracker.profiles`) says where its state word lives, its word
sets, what ends a task without a word, and where progress and artifacts are; the
rules here hold for every service (docs/architecture.md#from-a-record-to-a-state):

- a state word outranks everything else: failed if any word is in the failed set;
  completed if every word is in the done set (failed, `no_output`, when the service
  gives artifacts and there are none); pending if every word is a pending word;
  otherwise running (a song still streaming its preview is in flight);
- intermediate output is not a result: with no word, a record completes only on
  the profile's signal (`finished_at`, or for services whose finished records have
  none, `success: true` with an artifact);
- no word: `success: false` with a structured error fails; a bare `success: false`
  is a transient hiccup (unchanged); no `response` or an empty one is pending.

AceData's SDK (`acedatacloud._runtime.tasks.task_status`) is the tests' oracle where
it agrees with the vendor's documents; where it does not (it completes a Suno task
at its first preview URL), the documents win. Pure, but for one log line per record
that fits no rule.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

from tracker.profiles import (
    DONE_WORDS,
    FAILED_WORDS,
    GENERIC_NAME,
    PENDING_WORDS,
    Profile,
    profile_for,
)
from tracker.states import COMPLETED, FAILED, PENDING, RUNNING

log = logging.getLogger("tracker.tracking")

__all__ = [
    "DONE_WORDS",
    "FAILED_WORDS",
    "PENDING_WORDS",
    "Failure",
    "Observation",
    "normalise",
    "upstream_failure",
]

# Ids of records already logged as fitting no rule: each is logged once, not every poll
# (a worker's poll threads share it).
_UNFIT_LOGGED: OrderedDict[str, None] = OrderedDict()
_UNFIT_LOCK = threading.Lock()
_UNFIT_REMEMBERED = 10_000


@dataclass(frozen=True)
class Failure:
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class Observation(NamedTuple):
    """What one upstream record says. `state` None: nothing to learn, leave the task as is.

    `profile`: the rules it was read by (the service, or `generic`); `progress`: 0-100
    where the service reports one.
    """

    state: str | None
    upstream_state: str | None = None
    failure: Failure | None = None
    progress: int | None = None
    profile: str = GENERIC_NAME


def upstream_failure(response: dict[str, Any], *, default_code: str = "upstream_failed") -> Failure:
    """The failure reason a response carries: its `error` (`code`, `message`), or a message."""
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
    code = response.get("code")
    for key in ("message", "detail", "failure_reason", "fail_reason"):
        value = response.get(key)
        if isinstance(value, str) and value:
            return Failure(str(code) if isinstance(code, str) and code else default_code, value)
    return Failure(default_code, "The upstream reported the task as failed.")


def _failure(record: dict[str, Any], response: Any) -> Failure:
    """The failure reason wherever the record keeps it: the response, its data, the record."""
    places: list[Any] = [response]
    if isinstance(response, dict):
        data = response.get("data")
        places += data if isinstance(data, list) else [data]
    places += [record.get("task"), record]
    for place in places:
        if isinstance(place, dict) and (
            isinstance(place.get("error"), dict | str) and place.get("error")
        ):
            return upstream_failure(place)
    if isinstance(response, dict):
        return upstream_failure(response)
    return upstream_failure(record)


def normalise(record: dict[str, Any], service: str = "luma") -> Observation:
    """Reduce an upstream task record of `service` to the tracker's state."""
    return normalise_with(record, profile_for(service))


def normalise_with(record: dict[str, Any], profile: Profile) -> Observation:
    """Reduce a record with `profile`'s reading of it (docs/architecture.md)."""
    name = profile.service
    response = record.get("response")
    if response is not None and not isinstance(response, dict):
        _log_unfit(record, name, f"its `response` is a {type(response).__name__}, not an object")
        return Observation(None, profile=name)
    progress = profile.read_progress(record)

    words = profile.state_words(record)
    if words:
        # One pass (this runs for every record of every poll): a failed word decides; else
        # note the first word still in flight and whether every word is a pending one.
        in_flight: str | None = None
        all_pending = True
        for word in words:
            if word in profile.failed_words:
                return Observation(FAILED, word, _failure(record, response), progress, name)
            if word not in profile.done_words and in_flight is None:
                in_flight = word
            if word not in profile.pending_words:
                all_pending = False
        if in_flight is None:
            done = words[0]
            if profile.requires_output and not profile.read_outputs(record):
                failure = Failure(
                    "no_output", f"The upstream reported {done!r} but returned no artifact."
                )
                return Observation(FAILED, done, failure, progress, name)
            return Observation(COMPLETED, done, None, 100 if progress is not None else None, name)
        # A word in flight: previews or intermediate images are not a result.
        return Observation(PENDING if all_pending else RUNNING, in_flight, None, progress, name)

    source: dict[str, Any] = record if response is None else response
    success = source.get("success")
    if success is False:
        error = source.get("error")
        if isinstance(error, dict) and error.get("code"):
            return Observation(FAILED, None, _failure(record, response), progress, name)
    finished = record.get("finished_at") is not None or source.get("finished_at") is not None
    if finished and "finished_at" in profile.finish:
        if success is False:
            return Observation(FAILED, None, _failure(record, response), progress, name)
        if success is not True and profile.requires_output and not profile.read_outputs(record):
            # Settled without saying how and nothing to show yet: not a result.
            return Observation(RUNNING, None, None, progress, name)
        return Observation(COMPLETED, None, None, 100 if progress is not None else None, name)
    if success is True and "success" in profile.finish and profile.read_outputs(record):
        return Observation(COMPLETED, None, None, 100 if progress is not None else None, name)
    if success is False:
        return Observation(None, profile=name)  # a bare `success: false`: a transient hiccup
    if not response:
        return Observation(PENDING, None, None, progress, name)
    return Observation(RUNNING, None, None, progress, name)


def _log_unfit(record: dict[str, Any], profile: str, why: str) -> None:
    """A record that fits no rule changes nothing; it is logged once per id."""
    task_id = str(record.get("id"))
    with _UNFIT_LOCK:
        if task_id in _UNFIT_LOGGED:
            _UNFIT_LOGGED.move_to_end(task_id)
            return
        _UNFIT_LOGGED[task_id] = None
        if len(_UNFIT_LOGGED) > _UNFIT_REMEMBERED:
            _UNFIT_LOGGED.popitem(last=False)
    log.warning(
        "upstream record %s fits no rule of the %s profile (%s); the task stays as it is",
        task_id,
        profile,
        why,
        extra={"task_id": task_id, "profile": profile},
    )
