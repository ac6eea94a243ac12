"""The registration contract (docs/api.md), shared by the API, the CLI and `register_task`."""

from __future__ import annotations

import json
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tracker.config import SEVEN_DAYS
from tracker.errors import CallbackRefused
from tracker.states import DEFAULT_EVENTS

TASK_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
SERVICE_PATTERN = r"^[a-z0-9-]{1,32}$"
MAX_METADATA_BYTES = 16 * 1024
MAX_CALLBACK_URL = 2048

EventName = Literal["task.running", "task.completed", "task.failed", "task.timed_out"]


def _contains_nul(value: Any) -> bool:
    """Whether a JSON value holds a NUL character in any key or string, at any depth."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def parse_callback_url(url: str) -> SplitResult:
    """The parts of a callback URL, or `CallbackRefused` saying why it can never be sent to.

    The one check of a callback URL's form: at registration, and again before every attempt
    (`tracker.delivery.netguard.vet_callback`), which then checks where the host resolves.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise CallbackRefused(f"is not a valid URL: {exc} (got {url!r})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackRefused(
            f"must be an absolute http:// or https:// URL with a host (got {url!r})"
        )
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise CallbackRefused(f"must not contain white space or control characters (got {url!r})")
    return parts


DEFAULT_PORTS = {"http": 80, "https": 443}


def destination_of(url: str) -> str:
    """The destination of a callback URL: `scheme://host:port`, lower-case, the port explicit.

    Webhooks to one destination share its concurrency limit and circuit breaker
    (docs/webhooks.md). A URL `parse_callback_url` refuses keeps its text as its own
    destination, so it can still be recorded (and refused at send time).
    """
    try:
        parts = parse_callback_url(url)
        host = parts.hostname or ""
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except CallbackRefused:
        return url[:MAX_CALLBACK_URL]
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{parts.scheme.lower()}://{host.lower()}:{port}"


class TaskRegistration(BaseModel):
    """What a client asks the tracker to watch."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(
        pattern=TASK_ID_PATTERN,
        description="The upstream task id: 1-128 characters of A-Z a-z 0-9 . _ : -",
        examples=["50fc6182-fa86-4c7d-ac12-2fa27ec2f151"],
    )
    service: str = Field(
        "luma", pattern=SERVICE_PATTERN, description="Upstream service, e.g. luma, suno, kling."
    )
    callback_url: str | None = Field(
        None,
        max_length=MAX_CALLBACK_URL,
        description="Where webhooks go (http or https). Without it, no webhook is sent.",
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="A JSON object (<= 16 KiB) echoed in every webhook."
    )
    events: list[EventName] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),  # type: ignore[arg-type]
        description="Events to send; default all but task.running.",
    )
    timeout_seconds: int | None = Field(
        None,
        ge=1,
        le=SEVEN_DAYS,
        description="Seconds before the task is timed_out; default TRACKER_TASK_TIMEOUT.",
    )

    @field_validator("callback_url")
    @classmethod
    def _check_callback_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parse_callback_url(value)
        except CallbackRefused as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("metadata")
    @classmethod
    def _check_metadata_size(cls, value: dict[str, Any]) -> dict[str, Any]:
        # What the database and every webhook body can hold: strict JSON, valid UTF-8,
        # no NUL character (PostgreSQL's JSONB refuses it).
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            size = len(text.encode())
        except ValueError as exc:  # NaN or Infinity, or a lone surrogate (not UTF-8)
            raise ValueError(f"must be strict JSON in UTF-8: {exc}") from None
        if _contains_nul(value):
            raise ValueError("must not contain the NUL character (\\u0000)")
        if size > MAX_METADATA_BYTES:
            raise ValueError(f"must be at most {MAX_METADATA_BYTES} bytes of JSON (got {size})")
        return value

    @field_validator("events")
    @classmethod
    def _dedupe_events(cls, value: list[str]) -> list[str]:
        return sorted(set(value))
