"""Every service's example records, copied from the vendor's pages, are the tests.

`tests/support/upstream/services/<service>.json` holds each example record of the
vendor's task page for that service (and its generation page's final answers and
streaming lines, wrapped as a record's `response`), with the state, progress and
outputs it must normalise to. `_described.json` holds records the vendor's clients
describe but no page shows (Suno's top-level word with previews, Midjourney's
intermediate grids, ...). Where AceData's SDK disagrees, the documents win and the
disagreement is named here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from acedatacloud._runtime.tasks import task_status

from tracker.profiles import BY_SERVICE, GENERIC, PROFILES, profile_for, profile_name
from tracker.states import COMPLETED
from tracker.tracking.normalise import normalise

FIXTURES = Path(__file__).parents[1] / "support" / "upstream" / "services"
# Every task service the vendor's summary table lists.
SERVICES = [
    *("luma", "suno", "producer", "midjourney", "kling", "veo", "sora", "hailuo", "seedance"),
    *("nano-banana", "flux", "seedream", "wan", "pika", "pixverse", "fish", "grok", "minimax"),
    *("maestro", "dreamina", "happyhorse", "gemini", "openai", "webextrator", "captcha"),
    "digital-human",
]


def _examples() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(FIXTURES.glob("[!_]*.json")):
        found += [(path.stem, example) for example in json.loads(path.read_text())]
    return found


def _described() -> list[dict[str, Any]]:
    return list(json.loads((FIXTURES / "_described.json").read_text()))


EXAMPLES = _examples()
DESCRIBED = _described()
SDK_VERDICT = {COMPLETED: "succeeded", "failed": "failed", "pending": "", "running": "", None: ""}

# Where the vendor's SDK reads a documented record otherwise, and why the documents win.
SDK_DISAGREEMENTS = {
    # Streaming lines: a song `succeeded` beside one still `running` on its preview URL.
    # The SDK takes any done word for the whole task; the task is done when every song is.
    ("suno", "suno.md line 496"): "one song still running",
    # Midjourney's intermediate grids carry an image_url and `success: true`; with no word
    # and no finished_at the SDK calls any URL a result. "The image_url generated during
    # the process will be destroyed."
    ("midjourney", "midjourney.md line 469"): "intermediate grid, progress 35",
    ("midjourney", "midjourney.md line 470"): "intermediate grid, progress 75",
    ("midjourney", "midjourney.md line 471"): "last grid, no finished_at yet",
    # Done words outside the SDK's set: Dreamina's `done`, captcha's `ready`.
    ("dreamina", "dreamina.md line 102"): "`done` is Dreamina's done word",
    ("captcha", "captcha.md line 93"): "`ready` is captcha's done word",
}


def test_every_service_has_a_profile_and_example_records() -> None:
    assert sorted(BY_SERVICE) == sorted(SERVICES)
    described = {example["service"] for example in DESCRIBED}
    exemplified = {service for service, _ in EXAMPLES}
    # Services without a vendor page (pika, pixverse, digital-human) or without a record
    # in it (webextrator) have records described by the vendor's own clients.
    assert set(SERVICES) <= exemplified | described
    assert set(SERVICES) - exemplified == {"pika", "pixverse", "digital-human", "webextrator"}


@pytest.mark.parametrize(
    ("service", "example"), EXAMPLES, ids=[e["example"][:60] for _, e in EXAMPLES]
)
def test_vendor_example_normalises_as_documented(service: str, example: dict[str, Any]) -> None:
    observation = normalise(example["record"], service)
    assert observation.state == example["state"]
    assert observation.upstream_state == example["upstream_state"]
    assert observation.progress == example["progress"]
    assert observation.profile == service
    if "failure_code" in example:
        assert observation.failure is not None
        assert observation.failure.code == example["failure_code"]
    outputs = profile_for(service).read_outputs(example["record"])
    if observation.state == COMPLETED:
        assert [output["type"] for output in outputs] == example["outputs"]


@pytest.mark.parametrize("example", DESCRIBED, ids=[e["example"][28:90] for e in DESCRIBED])
def test_described_record_normalises_as_the_vendor_clients_read_it(
    example: dict[str, Any],
) -> None:
    observation = normalise(example["record"], example["service"])
    assert (observation.state, observation.upstream_state) == (
        example["state"],
        example["upstream_state"],
    )


@pytest.mark.parametrize(
    ("service", "example"), EXAMPLES, ids=[e["example"][:60] for _, e in EXAMPLES]
)
def test_sdk_agrees_with_the_documents_but_where_named(
    service: str, example: dict[str, Any]
) -> None:
    key = (service, example["example"].split(" (")[0])
    agrees = SDK_VERDICT[example["state"]] == task_status(example["record"])
    assert agrees != (key in SDK_DISAGREEMENTS), SDK_DISAGREEMENTS.get(key, "agrees")


def test_sdk_completes_a_suno_task_at_its_first_preview_and_the_documents_win() -> None:
    """The issue's own case: a top-level `pending` (as AceData's MCP reads Suno) while the
    songs already stream `audiopipe` previews. The SDK says done; the song does not exist."""
    preview = "https://audiopipe.suno.ai/?item_id=1f610752"
    record = {
        "id": "t",
        "state": "pending",
        "response": {"success": True, "data": [{"id": "s", "audio_url": preview}]},
    }
    assert task_status(record) == "succeeded"
    observation = normalise(record, "suno")
    assert (observation.state, observation.upstream_state) == ("pending", "pending")


def test_in_flight_previews_never_complete() -> None:
    in_flight = [
        (service, e)
        for service, e in EXAMPLES
        if "streaming line" in e["example"] and e["state"] != COMPLETED
    ]
    with_previews = [
        (service, e) for service, e in in_flight if profile_for(service).read_outputs(e["record"])
    ]
    assert len(with_previews) >= 5  # Suno's running lines, Midjourney's three grids
    for service, example in in_flight:
        assert normalise(example["record"], service).state != COMPLETED


def test_unknown_service_gets_the_generic_rules_and_says_so() -> None:
    record = {"id": "t", "response": {"state": "completed", "image_url": "https://x/y.png"}}
    observation = normalise(record, "qrart")
    assert (observation.state, observation.profile) == (COMPLETED, "generic")
    assert profile_name("qrart") == "generic"
    assert profile_for("qrart") is GENERIC
    assert GENERIC.read_outputs(record) == [{"type": "image", "url": "https://x/y.png"}]


def test_record_fitting_no_rule_changes_nothing_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = {"id": "odd-1", "response": ["not", "an", "object"]}
    with caplog.at_level("WARNING", logger="tracker.tracking"):
        for _ in range(3):
            assert normalise(record, "suno").state is None
    lines = [r for r in caplog.records if "fits no rule" in r.getMessage()]
    assert len(lines) == 1
    assert "odd-1" in lines[0].getMessage()


def test_outputs_carry_what_the_service_gives() -> None:
    luma = next(e for s, e in EXAMPLES if s == "luma" and e["example"] == "luma.md line 105")
    (video,) = profile_for("luma").read_outputs(luma["record"])
    assert video["type"] == "video"
    assert (video["width"], video["height"]) == (1360, 752)
    assert video["thumbnail_url"].startswith("https://")
    suno = next(e for s, e in EXAMPLES if s == "suno" and e["example"] == "suno.md line 108")
    audio = profile_for("suno").read_outputs(suno["record"])[0]
    assert audio["type"] == "audio"
    assert audio["title"] == "Holiday Wishes"
    assert audio["duration"] == 154.44


def test_profiles_are_declared_once_each_with_an_endpoint() -> None:
    assert len({p.service for p in PROFILES}) == len(PROFILES)
    for profile in PROFILES:
        assert profile.endpoint == f"/{profile.service}/tasks"
        assert profile.source
