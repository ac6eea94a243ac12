"""Normalisation of upstream records, table-tested and checked against AceData's SDK."""

from __future__ import annotations

from typing import Any

import pytest
from acedatacloud._runtime.tasks import task_status
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.profiles import GENERIC
from tracker.states import COMPLETED, FAILED, PENDING, RUNNING, can_transition
from tracker.tracking.normalise import (
    DONE_WORDS,
    FAILED_WORDS,
    PENDING_WORDS,
    normalise,
    normalise_with,
)

VIDEO = "https://platform.cdn.acedata.cloud/luma/x.mp4"


def luma(response: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"id": "t1", "created_at": 1725077411.961, "request": {}}
    if response is not None:
        record["response"] = response
    record.update(extra)
    return record


@pytest.mark.parametrize("word", sorted(DONE_WORDS))
def test_done_word_with_artifact_is_completed(word: str) -> None:
    obs = normalise(luma({"success": True, "state": word, "video_url": VIDEO}))
    assert (obs.state, obs.upstream_state, obs.failure) == (COMPLETED, word, None)


@pytest.mark.parametrize("word", sorted(DONE_WORDS))
def test_done_word_without_artifact_is_failed_no_output(word: str) -> None:
    obs = normalise(luma({"success": True, "state": word}))
    assert obs.state == FAILED
    assert obs.failure is not None
    assert obs.failure.code == "no_output"


@pytest.mark.parametrize("word", sorted(FAILED_WORDS))
def test_failed_word_outranks_success_flag(word: str) -> None:
    obs = normalise(luma({"success": True, "state": word.upper(), "video_url": VIDEO}))
    assert (obs.state, obs.upstream_state) == (FAILED, word)
    generic = normalise_with(luma({"success": True, "status": word, "video_url": VIDEO}), GENERIC)
    assert (generic.state, generic.upstream_state) == (FAILED, word)


@pytest.mark.parametrize("word", sorted(PENDING_WORDS))
def test_pending_words_are_pending(word: str) -> None:
    assert normalise(luma({"state": word})).state == PENDING


@pytest.mark.parametrize("word", ["processing", "dreaming", "running", "generating"])
def test_other_words_are_running(word: str) -> None:
    obs = normalise(luma({"success": True, "state": word}))
    assert (obs.state, obs.upstream_state) == (RUNNING, word)


def test_no_response_is_pending() -> None:
    assert normalise(luma(None)).state == PENDING


def test_empty_response_is_pending() -> None:
    assert normalise(luma({})).state == PENDING


def test_failure_reason_is_response_error() -> None:
    obs = normalise(
        luma(
            {"success": False, "state": "failed", "error": {"code": "bad_prompt", "message": "no"}}
        )
    )
    assert obs.failure is not None
    assert obs.failure.as_dict() == {"code": "bad_prompt", "message": "no"}


def test_structured_error_without_word_is_failed() -> None:
    obs = normalise(luma({"success": False, "error": {"code": "no_channel", "message": "busy"}}))
    assert obs.state == FAILED
    assert obs.failure is not None
    assert obs.failure.code == "no_channel"


def test_bare_success_false_changes_nothing() -> None:
    assert normalise(luma({"success": False, "error": "temporary"})).state is None


def test_finished_at_with_success_is_completed() -> None:
    assert normalise(luma({"success": True}, finished_at=1725077566.2)).state == COMPLETED


def test_nested_state_in_data_list() -> None:
    """The generic rules (a service without a profile) find a word at any depth."""
    record = luma({"success": True, "data": [{"state": "succeeded", "video_url": VIDEO}]})
    assert normalise_with(record, GENERIC).state == COMPLETED
    record = luma({"success": True, "data": [{"state": "processing"}, {"state": "error"}]})
    assert normalise_with(record, GENERIC).state == FAILED
    record = luma({"success": True, "data": [{"state": "queued"}, {"state": "queued"}]})
    assert normalise_with(record, GENERIC).state == PENDING


def test_a_done_item_beside_one_in_flight_is_not_done() -> None:
    record = luma({"data": [{"state": "succeeded", "video_url": VIDEO}, {"state": "running"}]})
    assert normalise_with(record, GENERIC).state == RUNNING
    assert task_status(record) == "succeeded"  # the SDK: any done word; the documents win


def test_an_artifact_without_word_or_finished_at_is_not_a_result() -> None:
    record = luma({"success": True, "video_url": VIDEO})
    assert normalise_with(record, GENERIC).state == RUNNING
    assert task_status(record) == "succeeded"  # the SDK; intermediate output is no result


def test_success_false_beside_an_artifact_without_error_is_a_hiccup() -> None:
    record = luma({"success": False, "video_url": VIDEO})
    assert normalise_with(record, GENERIC).state is None
    assert task_status(record) == "failed"  # the SDK; a bare `success: false` changes nothing


def test_documented_example_record_is_completed() -> None:
    record = luma(
        {
            "success": True,
            "task_id": "50fc6182",
            "video_url": VIDEO,
            "state": "completed",
            "thumbnail_url": "https://platform.cdn.acedata.cloud/luma/x.jpg",
        },
        finished_at=1725077566.241,
    )
    assert normalise(record).state == COMPLETED


def test_terminal_states_are_final() -> None:
    assert can_transition(PENDING, RUNNING)
    assert can_transition(PENDING, COMPLETED)
    assert not can_transition(RUNNING, PENDING)
    assert not can_transition(COMPLETED, FAILED)
    assert not can_transition(RUNNING, RUNNING)


SDK_VERDICT = {COMPLETED: "succeeded", FAILED: "failed", PENDING: "", RUNNING: "", None: ""}
# The SDK is an oracle for the generic rules, where it agrees with the vendor documents.

words = st.sampled_from(
    [*sorted(DONE_WORDS | FAILED_WORDS | PENDING_WORDS), "processing", "dreaming", "Completed"]
)
leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), words, st.just(VIDEO), st.text(max_size=5)
)
keys = st.sampled_from(
    ["state", "status", "success", "video_url", "url", "finished_at", "error", "data", "code"]
)
json_like = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(
    response=st.one_of(st.none(), st.dictionaries(keys, json_like, max_size=5)),
    finished=st.one_of(st.none(), st.floats(1e9, 2e9)),
)
def test_agrees_with_acedata_sdk(response: dict[str, Any] | None, finished: float | None) -> None:
    """On any record, the generic rules' verdict is the vendor SDK's (terminal or not, and
    which terminal), but for the disagreements named above, where the documents win."""
    record = luma(response)
    if finished is not None:
        record["finished_at"] = finished
    ours = normalise_with(record, GENERIC).state
    if _named_disagreement(record, ours):
        return
    assert SDK_VERDICT[ours] == task_status(record)


def _named_disagreement(record: dict[str, Any], ours: str | None) -> bool:
    """The three places the documents overrule the SDK (the tests above pin each)."""
    sdk = task_status(record)
    source = record.get("response")
    source = record if source is None else source
    if not isinstance(source, dict):
        return False
    words = GENERIC.state_words(record)
    has_url = bool(GENERIC.read_outputs(record))
    finished = record.get("finished_at") is not None or source.get("finished_at") is not None
    mixed = bool(words) and any(w in DONE_WORDS for w in words) and ours == RUNNING
    preview = not words and not finished and has_url and ours == RUNNING
    hiccup = not words and source.get("success") is False and ours is None
    # A done word beside one in flight: the SDK ends the task (succeeded, or failed for want
    # of an artifact); the task is done when every word is.
    return mixed or (sdk == "succeeded" and preview) or (sdk == "failed" and hiccup)
