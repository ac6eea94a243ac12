"""Normalisation of upstream records, table-tested and checked against AceData's SDK."""

from __future__ import annotations

from typing import Any

import pytest
from acedatacloud._runtime.tasks import task_status
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.states import COMPLETED, FAILED, PENDING, RUNNING, can_transition
from tracker.tracking.normalise import DONE_WORDS, FAILED_WORDS, PENDING_WORDS, normalise

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
    obs = normalise(luma({"success": True, "status": word.upper(), "video_url": VIDEO}))
    assert (obs.state, obs.upstream_state) == (FAILED, word)


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
    record = luma({"success": True, "data": [{"state": "succeeded", "video_url": VIDEO}]})
    assert normalise(record).state == COMPLETED
    record = luma({"success": True, "data": [{"state": "processing"}, {"state": "error"}]})
    assert normalise(record).state == FAILED
    record = luma({"success": True, "data": [{"state": "queued"}, {"state": "queued"}]})
    assert normalise(record).state == PENDING


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
    """On any record, our verdict is the vendor SDK's (terminal or not, and which terminal)."""
    record = luma(response)
    if finished is not None:
        record["finished_at"] = finished
    assert SDK_VERDICT[normalise(record).state] == task_status(record)
