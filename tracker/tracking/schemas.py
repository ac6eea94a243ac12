"""The registration contract (docs/api.md), shared by the API, the CLI and `register_task`."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from typing_extensions import TypeAliasType

from tracker.config import SEVEN_DAYS
from tracker.errors import CallbackRefused
from tracker.states import DEFAULT_EVENTS

TASK_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
SERVICE_PATTERN = r"^[a-z0-9-]{1,32}$"
MAX_METADATA_BYTES = 16 * 1024
MAX_CALLBACK_URL = 2048
# What a callback URL may be, as a pattern the OpenAPI document states: http or https,
# printable ASCII, an optional user:password@, a host name (letters, digits, `-`, `_`,
# dot-separated), an IPv4 address or a bracketed IPv6 one, an optional port (0-65535),
# then a path, query or fragment. Every URL of this form passes `parse_callback_url`, and
# registration refuses any other, so the document is exactly as strict as the validation
# (an internationalised name is given in punycode).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_H16 = r"[0-9A-Fa-f]{1,4}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "|".join(  # RFC 3986's IPv6address, form by form
    [
        rf"(?:{_H16}:){{6}}{_LS32}",
        rf"::(?:{_H16}:){{5}}{_LS32}",
        rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
        rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
        rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
        rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
        rf"(?:(?:{_H16}:){{0,6}}{_H16})?::",
    ]
)
_HOST = rf"(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[(?:{_IPV6})\])"
_PORT = r"(?::(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
CALLBACK_URL_PATTERN = (
    rf"^https?://(?:[A-Za-z0-9._~%!$&'()*+,;=:-]*@)?{_HOST}{_PORT}(?:[/?#][!-~]*)?$"
)
# Every URL the tracker will send to (callback, default callback, operations URL): the
# OpenAPI document states what the validation enforces.
CallbackUrl = Annotated[str, Field(max_length=MAX_CALLBACK_URL, pattern=CALLBACK_URL_PATTERN)]

# Metadata is any JSON object without the NUL character (PostgreSQL's JSONB refuses it),
# stated as a recursive schema so that the OpenAPI document says so too. Its size limit
# (16 KiB of JSON) is checked below; JSON Schema cannot state it.
NO_NUL_PATTERN = r"^[^\x00]*$"
MetadataText = Annotated[str, Field(pattern=NO_NUL_PATTERN)]
# A JSON object's keys must match too (JSON Schema's patternProperties alone lets others by).
_CLOSED = Field(json_schema_extra={"additionalProperties": False})
if TYPE_CHECKING:  # mypy cannot follow the recursive alias; it is JSON either way
    MetadataObject = dict[str, Any]
else:
    MetadataValue = TypeAliasType(
        "MetadataValue",
        Union[  # noqa: UP007 - a recursive alias needs the Union form
            bool,
            int,
            float,
            MetadataText,
            list["MetadataValue"],
            Annotated[dict[MetadataText, "MetadataValue"], _CLOSED],
            None,
        ],
    )
    MetadataObject = Annotated[dict[MetadataText, MetadataValue], _CLOSED]

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


def check_callback_url(value: Any) -> Any:
    """A callback URL, or ValueError saying plainly why it is refused. Anything but a string
    is left to the field's type and pattern (validators run before them)."""
    if not isinstance(value, str):
        return value
    try:
        parse_callback_url(value)
    except CallbackRefused as exc:
        raise ValueError(exc.message) from None
    return value


def check_json_object(value: Any, *, max_bytes: int) -> Any:
    """A JSON object the database and every webhook body can hold: strict JSON, valid UTF-8,
    no NUL character (PostgreSQL's JSONB refuses it), at most `max_bytes`; else ValueError.
    Anything but an object is left to the field's type check."""
    if not isinstance(value, dict):
        return value
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        size = len(text.encode())
    except ValueError as exc:  # NaN or Infinity, or a lone surrogate (not UTF-8)
        raise ValueError(f"must be strict JSON in UTF-8: {exc}") from None
    if _contains_nul(value):
        raise ValueError("must not contain the NUL character (\\u0000)")
    if size > max_bytes:
        raise ValueError(f"must be at most {max_bytes} bytes of JSON (got {size})")
    return value


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


# RFC 3339's date-time, as the OpenAPI document's `date-time` format says: a zone is
# required (a bare time would mean UTC to one client and local time to another).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _rfc3339(value: object) -> object:
    if isinstance(value, str):
        if not _RFC3339.fullmatch(value):
            raise ValueError(
                "must be an RFC 3339 date-time with its zone, e.g. 2024-08-31T04:12:46Z "
                f"(got {value[:80]!r})"
            )
        return value.upper()
    if isinstance(value, datetime):
        return value
    raise ValueError(f"must be an RFC 3339 date-time string (got {value!r})")


DateTimeWithZone = Annotated[datetime, BeforeValidator(_rfc3339)]


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
    callback_url: CallbackUrl | None = Field(
        None,
        description=(
            "Where webhooks go: an http or https URL of printable ASCII with a host name "
            "(punycode for an internationalised one) or IPv4 address. Without it, no "
            "webhook is sent."
        ),
        examples=["https://example.com/hooks/acedata"],
    )
    metadata: MetadataObject = Field(
        default_factory=dict,
        description="A JSON object (<= 16 KiB, no NUL character) echoed in every webhook.",
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

    @field_validator("callback_url", mode="before")
    @classmethod
    def _check_callback_url(cls, value: object) -> object:
        """The URL's own problems first, said plainly; then the pattern applies."""
        return check_callback_url(value)

    @field_validator("metadata", mode="before")
    @classmethod
    def _check_metadata_size(cls, value: Any) -> Any:
        return check_json_object(value, max_bytes=MAX_METADATA_BYTES)

    @field_validator("events")
    @classmethod
    def _dedupe_events(cls, value: list[str]) -> list[str]:
        return sorted(set(value))
