"""Service profiles: how each AceData task service keeps its state, progress and artifacts.

`model` says what a profile is and reads records with one; `catalogue` holds one
entry per service. `profile_for(service)` is a dictionary look-up; a service with
no entry gets `GENERIC`, the rules that hold for every service
(docs/architecture.md#from-a-record-to-a-state).

A base module, beside `states`: pure data and pure functions, importing nothing of
the tracker but `states`, so that normalisation (tracking), the resources (db) and
the schedule (polling) read the same profiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracker.profiles.catalogue import PROFILES
from tracker.profiles.model import (
    DONE_WORDS,
    FAILED_WORDS,
    OUTPUT_TYPES,
    PENDING_WORDS,
    OutputSpec,
    Profile,
)

GENERIC_NAME = "generic"
GENERIC = Profile(GENERIC_NAME, None, source="the rules that hold for every service")

BY_SERVICE: Mapping[str, Profile] = {profile.service: profile for profile in PROFILES}
if len(BY_SERVICE) != len(PROFILES):
    raise RuntimeError("two profiles name the same service")


def profile_for(service: str) -> Profile:
    """The profile of `service`, or the generic rules for a service the tracker does not know."""
    return BY_SERVICE.get(service, GENERIC)


def profile_name(service: str) -> str:
    """The name of the rules `service` is normalised by: itself, or `generic`."""
    return service if service in BY_SERVICE else GENERIC_NAME


def outputs_of(service: str, record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The artifacts of a finished task's record in one shape (`[]` without a record)."""
    return profile_for(service).read_outputs(record) if isinstance(record, dict) else []


def service_listing() -> list[dict[str, Any]]:
    """The services this tracker knows, as `GET /v1/services` and `tracker services` list
    them: `{"service", "endpoint", "progress", "outputs"}`, by name."""
    return [
        {
            "service": profile.service,
            "endpoint": profile.endpoint,
            "progress": profile.progress_at is not None,
            "outputs": profile.output_types,
        }
        for profile in sorted(PROFILES, key=lambda p: p.service)
    ]


def advised_poll_intervals() -> dict[str, float]:
    """Seconds between polls of a fresh task, per service whose vendor advises a pace."""
    return {p.service: p.poll_interval for p in PROFILES if p.poll_interval is not None}


__all__ = [
    "BY_SERVICE",
    "DONE_WORDS",
    "FAILED_WORDS",
    "GENERIC",
    "GENERIC_NAME",
    "OUTPUT_TYPES",
    "PENDING_WORDS",
    "PROFILES",
    "OutputSpec",
    "Profile",
    "advised_poll_intervals",
    "outputs_of",
    "profile_for",
    "profile_name",
    "service_listing",
]
