"""Submissions through the tracker: the submit contract and its idempotency keys.

A submission forwards a generation request to the upstream and registers the task
it answers (`tracker.api.submit`). It spends credits, so it is never retried by the
tracker; a client that retries sends the same `Idempotency-Key` and gets the first
answer again. Functions take a session and do not commit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tracker.config import SEVEN_DAYS
from tracker.db.models import Client, IdempotencyKey
from tracker.states import DEFAULT_EVENTS
from tracker.tracking.schemas import (
    MAX_METADATA_BYTES,
    CallbackUrl,
    EventName,
    MetadataObject,
    check_callback_url,
    check_json_object,
)

# A generation path under the service: `videos`, `imagine`, `audios/generate`; never `tasks`.
ENDPOINT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}(/[a-z0-9][a-z0-9_-]{0,63}){0,3}$"
MAX_REQUEST_BYTES = 512 * 1024
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"  # printable ASCII, no space


class SubmitRequest(BaseModel):
    """A generation request to forward, and how to track the task it starts."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = Field(
        pattern=ENDPOINT_PATTERN,
        max_length=255,
        description="The generation path under the service, e.g. `videos` for /luma/videos.",
        examples=["videos"],
    )
    request: MetadataObject = Field(
        description=(
            "The vendor's request body (a JSON object without the NUL character), forwarded "
            "unchanged except `callback_url`, which the tracker sets to its doorbell when "
            "TRACKER_PUBLIC_URL is set."
        ),
        examples=[{"action": "generate", "prompt": "A cat surfing a wave"}],
    )
    callback_url: CallbackUrl | None = Field(
        None,
        description="Where the tracker's webhooks go (http or https). Without it, none is sent.",
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

    @field_validator("endpoint")
    @classmethod
    def _not_the_task_api(cls, value: str) -> str:
        if value.split("/")[0] == "tasks":
            raise ValueError(
                "`tasks` is the task API the tracker polls, not a generation endpoint; use "
                f"e.g. `videos` (got {value!r})"
            )
        return value

    @field_validator("request", mode="before")
    @classmethod
    def _check_request(cls, value: Any) -> Any:
        return check_json_object(value, max_bytes=MAX_REQUEST_BYTES)

    @field_validator("callback_url", mode="before")
    @classmethod
    def _check_callback_url(cls, value: Any) -> Any:
        return check_callback_url(value)

    @field_validator("metadata", mode="before")
    @classmethod
    def _check_metadata(cls, value: Any) -> Any:
        return check_json_object(value, max_bytes=MAX_METADATA_BYTES)

    @field_validator("events")
    @classmethod
    def _dedupe_events(cls, value: list[str]) -> list[str]:
        return sorted(set(value))


def submission_hash(service: str, submission: SubmitRequest) -> str:
    """A fingerprint of a submission: the same key must come with the same submission."""
    text = json.dumps(
        {"service": service, **submission.model_dump(mode="json")},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class KeyClaim:
    """What an idempotency key says about a submission: `row` to complete if it is new,
    else the earlier one (`earlier`: in flight while its `status_code` is None)."""

    row: IdempotencyKey | None
    earlier: IdempotencyKey | None


def claim_idempotency_key(
    session: Session, client: Client, key: str, request_hash: str, *, now: datetime
) -> KeyClaim:
    """Record `key` as in flight for this submission, or return the submission it was first
    used for. The caller commits before forwarding, so a retry racing the first waits or
    finds it."""
    existing = _find(session, client.id, key)
    if existing is not None:
        return KeyClaim(None, existing)
    row = IdempotencyKey(client_id=client.id, key=key, request_hash=request_hash, created_at=now)
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:  # another request took the key a moment ago
        return KeyClaim(None, _find(session, client.id, key))
    return KeyClaim(row, None)


def complete_idempotency_key(
    session: Session, key_id: int, status_code: int, answer: dict[str, Any], *, now: datetime
) -> None:
    """Keep the answer a submission got: a retry with its key is answered the same."""
    row = session.get(IdempotencyKey, key_id)
    if row is not None:
        row.status_code, row.answer, row.completed_at = status_code, answer, now


def _find(session: Session, client_id: int, key: str) -> IdempotencyKey | None:
    return session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.client_id == client_id, IdempotencyKey.key == key
        )
    )
