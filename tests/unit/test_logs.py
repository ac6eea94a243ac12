"""Log lines: JSON with context fields, and no secret survives in message, args or context."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from tracker.config import load_settings
from tracker.observability.logs import MASK, configure_logging


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging(
        load_settings(upstream_token="upstream-token-abcdef", log_format="json", _env_file=None),
        stream=stream,
    )
    yield stream
    root.handlers[:], root.level = saved


def test_one_json_object_per_line_with_context(log_stream: io.StringIO) -> None:
    logging.getLogger("tracker.test").info(
        "polled %d ids", 3, extra={"trace_id": "abc", "task_id": "t1"}
    )
    line = json.loads(log_stream.getvalue().splitlines()[-1])
    assert line["message"] == "polled 3 ids"
    assert (line["level"], line["logger"]) == ("info", "tracker.test")
    assert (line["trace_id"], line["task_id"]) == ("abc", "t1")


def test_secrets_are_masked_wherever_they_appear(log_stream: io.StringIO) -> None:
    log = logging.getLogger("tracker.test")
    api_key = "trk_" + "k" * 40
    secret = "whsec_" + "c2VjcmV0" * 5
    log.warning("key %s and %s", api_key, secret, extra={"header": "Bearer abcdefghijkl"})
    log.error("the upstream said no to upstream-token-abcdef")
    try:
        raise RuntimeError(f"boom with {api_key}")
    except RuntimeError:
        log.exception("failed")
    text = log_stream.getvalue()
    for leaked in (api_key, secret, "abcdefghijkl", "upstream-token-abcdef"):
        assert leaked not in text
    assert text.count(MASK) >= 5
