"""Standard Webhooks v1 signatures (https://www.standardwebhooks.com).

A signature is `v1,` and the base64 HMAC-SHA256, keyed with the decoded
secret, of `"{webhook-id}.{webhook-timestamp}.{body}"`. A secret is `whsec_`
and the base64 key. During a secret rotation every webhook carries one
signature per secret in force, space-separated, so a receiver holding either
secret verifies it. Receivers can use the reference library `standardwebhooks`;
`verify` here is the same check, for our own tests and the demo receiver.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

import tracker
from tracker.config import WEBHOOK_SECRET_PREFIX
from tracker.errors import SignatureError

SIGNATURE_VERSION = "v1"
# Receivers reject timestamps further than this from their clock (replay protection).
DEFAULT_TOLERANCE_SECONDS = 300


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_...` secret (the base64 after the prefix)."""
    encoded = secret.removeprefix(WEBHOOK_SECRET_PREFIX).rstrip("=")
    try:
        # Padding restored, so secrets stored without it still work.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError("a webhook secret must be `whsec_` followed by base64") from None
    if not key:
        raise ValueError("a webhook secret cannot be empty")
    return key


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """One signature: `v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}.{body}">`."""
    signed = f"{msg_id}.{timestamp}.".encode() + _as_bytes(body)
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The `webhook-signature` header: one signature per secret in force, space-separated."""
    if not secrets:
        raise ValueError("at least one secret is needed to sign a webhook")
    return " ".join(sign(secret, msg_id, timestamp, body) for secret in secrets)


def webhook_headers(
    secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes | str
) -> dict[str, str]:
    """Every header of a webhook request (docs/webhooks.md)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": f"tracker/{tracker.__version__}",
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Check a received webhook against `secret`; raises `SignatureError` if it does not verify."""
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = lowered.get("webhook-id")
    timestamp_text = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not (msg_id and timestamp_text and signatures):
        raise SignatureError(
            "missing webhook-id, webhook-timestamp or webhook-signature header "
            f"(got {sorted(lowered)!r})"
        )
    try:
        timestamp = int(timestamp_text)
    except ValueError:
        raise SignatureError(
            f"webhook-timestamp must be Unix seconds (got {timestamp_text!r})"
        ) from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(
            f"webhook-timestamp {timestamp} is more than {tolerance:g} s from now ({current:.0f}); "
            "check the receiver's clock, or this is a replay"
        )
    expected = sign(secret, msg_id, timestamp, body)
    for candidate in signatures.split():
        if hmac.compare_digest(candidate.encode(), expected.encode()):
            return
    raise SignatureError("no signature matches this secret; is it the client's current secret?")
