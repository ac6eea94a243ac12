"""Standard Webhooks signatures, checked against the reference library `standardwebhooks`."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

import tracker
from tracker.delivery.signing import sign, signature_header, verify, webhook_headers
from tracker.errors import SignatureError
from tracker.tracking.clients import new_webhook_secret

BODY = '{"type":"task.completed","data":{"task_id":"t-1","note":"d\u00e9j\u00e0 vu"}}'


def test_sign_matches_the_reference_library() -> None:
    secret = new_webhook_secret()
    timestamp = int(time.time())
    expected = Webhook(secret).sign("msg_1", datetime.fromtimestamp(timestamp, UTC), BODY)
    assert sign(secret, "msg_1", timestamp, BODY) == expected
    assert sign(secret, "msg_1", timestamp, BODY.encode()) == expected


def test_headers_verify_with_the_reference_library() -> None:
    secret = new_webhook_secret()
    headers = webhook_headers([secret], "msg_1", int(time.time()), BODY.encode())
    assert Webhook(secret).verify(BODY.encode(), headers)["data"]["task_id"] == "t-1"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == f"tracker/{tracker.__version__}"
    assert headers["webhook-id"] == "msg_1"


def test_rotation_header_carries_one_signature_per_secret_and_each_verifies() -> None:
    old, new = new_webhook_secret(), new_webhook_secret()
    headers = webhook_headers([new, old], "msg_1", int(time.time()), BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify(BODY, headers)


def test_verify_accepts_good_and_rejects_tampered_stale_or_foreign_webhooks() -> None:
    secret = new_webhook_secret()
    now = int(time.time())
    headers = webhook_headers([secret], "msg_1", now, BODY)
    verify(secret, headers, BODY)
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(secret, headers, BODY.replace("t-1", "t-2"))
    with pytest.raises(SignatureError, match="no signature matches"):
        verify(new_webhook_secret(), headers, BODY)
    with pytest.raises(SignatureError, match="replay"):
        verify(secret, headers, BODY, now=now + 301)
    with pytest.raises(SignatureError, match="missing"):
        verify(secret, {"webhook-id": "msg_1"}, BODY)


def test_signature_header_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="at least one secret"):
        signature_header([], "msg_1", 0, BODY)


def test_a_secret_that_is_not_base64_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        sign("whsec_not base64!", "msg_1", 0, BODY)
