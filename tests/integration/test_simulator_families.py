"""The simulator speaks every service's family, in the vendor's shapes (the fixtures).

For each service, a task seen at each phase of its run must read, through the
service's profile, as the simulator's truth: in flight until it settled, then the
outcome, with the artifacts of the vendor's own example records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.sim import SimulatorHandle
from tracker.profiles import BY_SERVICE, profile_for
from tracker.tracking.normalise import normalise

FIXTURES = Path(__file__).parents[1] / "support" / "upstream" / "services"
# (age, duration, outcome) -> what the tracker must read
PHASES = {
    "before a response": (1.0, 100.0, "completed"),
    "queued": (3.0, 100.0, "completed"),
    "generating": (50.0, 100.0, "completed"),
    "completed": (10.0, 0.0, "completed"),
    "failed": (10.0, 0.0, "failed"),
}


def _vendor_completed(service: str) -> dict[str, Any] | None:
    path = FIXTURES / f"{service}.json"
    if not path.exists():
        return None
    for example in json.loads(path.read_text()):
        if example["state"] == "completed" and "wrapped" not in example["example"]:
            return dict(example["record"])
    return None


def _record(simulator: SimulatorHandle, service: str, phase: str) -> dict[str, Any]:
    age, duration, outcome = PHASES[phase]
    (task_id,) = simulator.seed(
        [{"service": service, "age": age, "duration": duration, "outcome": outcome}]
    )
    record: dict[str, Any] = simulator.task(task_id)["record"]
    return record


@pytest.mark.parametrize("service", sorted(BY_SERVICE))
def test_each_phase_reads_as_the_simulators_truth(simulator: SimulatorHandle, service: str) -> None:
    seen = {phase: normalise(_record(simulator, service, phase), service) for phase in PHASES}
    for phase in ("before a response", "queued", "generating"):
        assert seen[phase].state in ("pending", "running"), (phase, seen[phase])
    assert seen["completed"].state == "completed", seen["completed"]
    assert seen["failed"].state == "failed", seen["failed"]


@pytest.mark.parametrize("service", sorted(BY_SERVICE))
def test_a_finished_record_has_the_artifacts_of_the_vendors_example(
    simulator: SimulatorHandle, service: str
) -> None:
    vendor = _vendor_completed(service)
    simulated = _record(simulator, service, "completed")
    profile = profile_for(service)
    outputs = {o["type"] for o in profile.read_outputs(simulated)}
    if profile.requires_output:
        assert outputs
    if vendor is not None:
        assert outputs <= {o["type"] for o in profile.read_outputs(vendor)} | {"file"}
        vendor_words = profile.state_words(vendor)
        assert bool(profile.state_words(simulated)) == bool(vendor_words) or not vendor_words


def test_suno_streams_previews_and_midjourney_grids_while_in_flight(
    simulator: SimulatorHandle,
) -> None:
    song = _record(simulator, "suno", "generating")
    assert song["state"] == "processing"
    previews = [item["audio_url"] for item in song["response"]["data"]]
    assert all(url.startswith("https://audiopipe.suno.ai/") for url in previews)
    assert normalise(song, "suno").state == "running"
    grid = _record(simulator, "midjourney", "generating")
    assert "finished_at" not in grid
    assert 0 < grid["response"]["progress"] < 100
    assert grid["response"]["image_url"].startswith("https://")
    observation = normalise(grid, "midjourney")
    assert (observation.state, observation.progress) == ("running", grid["response"]["progress"])
