"""Clients: API keys (stored only as hashes) and webhook signing secrets with rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from tracker.clock import utcnow
from tracker.config import WEBHOOK_SECRET_PREFIX
from tracker.db.models import Client, WebhookSecret
from tracker.errors import CallbackRefused, ClientExists, ClientNotFound
from tracker.states import EVENTS
from tracker.tracking.schemas import MAX_CALLBACK_URL, parse_callback_url

API_KEY_PREFIX = "trk_"


@dataclass(frozen=True)
class NewClient:
    """A client as created: the only moment its API key can be shown."""

    client: Client
    api_key: str
    webhook_secret: str


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_webhook_secret() -> str:
    """`whsec_` and base64 of 32 random bytes, as Standard Webhooks libraries expect."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def create_client(session: Session, name: str, *, now: datetime | None = None) -> NewClient:
    """Create a client with a fresh API key and webhook secret."""
    now = now or utcnow()
    if session.scalar(select(Client.id).where(Client.name == name)) is not None:
        raise ClientExists(f"a client named {name!r} exists already; choose another name")
    api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    secret = new_webhook_secret()
    client = Client(
        name=name,
        api_key_hash=hash_api_key(api_key),
        api_key_prefix=api_key[:10],
        created_at=now,
    )
    client.secrets.append(WebhookSecret(secret=secret, created_at=now, expires_at=None))
    session.add(client)
    session.flush()
    return NewClient(client=client, api_key=api_key, webhook_secret=secret)


def get_client(session: Session, name: str) -> Client:
    client = session.scalar(select(Client).where(Client.name == name))
    if client is None:
        raise ClientNotFound(f"no client named {name!r}; `tracker clients list` shows them")
    return client


CLIENT_SETTINGS = ("default_callback_url", "default_events", "operations_url")


def client_settings(client: Client) -> dict[str, object]:
    """A client's own settings, as `GET /v1/client` shows them."""
    return {
        "name": client.name,
        "default_callback_url": client.default_callback_url,
        "default_events": client.default_events,
        "operations_url": client.operations_url,
    }


def update_client_settings(
    session: Session, client_id: int, changes: Mapping[str, object]
) -> Client:
    """Set (or, with None, unset) a client's defaults and operations URL; vetted first.

    `default_callback_url` and `operations_url` must be callback URLs
    (`parse_callback_url`); `default_events` a list of task events.
    """
    client = session.get(Client, client_id, populate_existing=True)
    if client is None:
        raise ClientNotFound(f"no client {client_id!r}")
    for name, value in changes.items():
        if name not in CLIENT_SETTINGS:
            raise ValueError(f"{name}: not a client setting (one of {', '.join(CLIENT_SETTINGS)})")
        if name in ("default_callback_url", "operations_url") and value is not None:
            if not isinstance(value, str) or len(value) > MAX_CALLBACK_URL:
                raise CallbackRefused(
                    f"{name}: must be an http(s) URL of at most {MAX_CALLBACK_URL} characters"
                )
            try:
                parse_callback_url(value)
            except CallbackRefused as exc:
                raise CallbackRefused(f"{name}: {exc.message}") from None
        if name == "default_events" and value is not None:
            if not isinstance(value, list) or not set(value) <= EVENTS:
                raise CallbackRefused(
                    f"default_events: must be a list of {', '.join(sorted(EVENTS))} "
                    f"(got {value!r})",
                    code="invalid_events",
                )
            value = sorted(set(value))
        setattr(client, name, value)
    session.flush()
    return client


def authenticate(session: Session, api_key: str) -> Client | None:
    """The client holding `api_key`, or None. Looked up by hash, confirmed in constant time."""
    digest = hash_api_key(api_key)
    client = session.scalar(select(Client).where(Client.api_key_hash == digest))
    if client is None or not hmac.compare_digest(client.api_key_hash, digest):
        return None
    return client


class KeyCache:
    """API keys already checked, by hash: a request with a known key needs no database read
    (docs/decisions/0012-api-key-cache.md).

    Only keys that authenticated are kept, each for `ttl` seconds, at most `size` of
    them (the oldest go first). Clients are never deleted and their API keys never
    change, so an entry cannot go stale; the time limit bounds what a future way of
    revoking keys would have to wait for. Thread-safe. The clients are detached
    instances with their columns loaded: read them, never add them to a session.
    """

    def __init__(
        self, *, ttl: float = 60.0, size: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._entries: dict[str, tuple[float, Client]] = {}
        self._lock = threading.Lock()

    def get(self, api_key: str) -> Client | None:
        """The client of a key checked less than `ttl` seconds ago, or None."""
        digest = hash_api_key(api_key)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            expires, client = entry
            if expires <= self._clock():
                del self._entries[digest]
                return None
            return client

    def put(self, api_key: str, client: Client) -> None:
        digest = hash_api_key(api_key)
        with self._lock:
            self._entries.pop(digest, None)
            while len(self._entries) >= self._size:
                del self._entries[next(iter(self._entries))]  # dicts keep insertion order
            self._entries[digest] = (self._clock() + self._ttl, client)


def active_secrets(client: Client, *, now: datetime | None = None) -> list[str]:
    """Secrets that sign webhooks now, newest first (two during a rotation's grace period)."""
    now = now or utcnow()
    valid = [s for s in client.secrets if s.expires_at is None or s.expires_at > now]
    return [s.secret for s in sorted(valid, key=lambda s: s.id, reverse=True)]


def secrets_in_force(
    session: Session, client_ids: Collection[int], *, now: datetime
) -> dict[int, list[str]]:
    """`active_secrets` of several clients in one query: client id -> secrets, newest first."""
    if not client_ids:
        return {}
    rows = session.execute(
        select(WebhookSecret.client_id, WebhookSecret.secret)
        .where(
            WebhookSecret.client_id.in_(client_ids),
            or_(WebhookSecret.expires_at.is_(None), WebhookSecret.expires_at > now),
        )
        .order_by(WebhookSecret.id.desc())
    )
    in_force: dict[int, list[str]] = {}
    for client_id, secret in rows:
        in_force.setdefault(client_id, []).append(secret)
    return in_force


def rotate_secret(
    session: Session, client: Client, *, grace_seconds: float, now: datetime | None = None
) -> str:
    """Add a new secret; the current ones stay valid for `grace_seconds` more."""
    now = now or utcnow()
    expires = now + timedelta(seconds=grace_seconds)
    for old in client.secrets:
        if old.expires_at is None or old.expires_at > expires:
            old.expires_at = expires
    secret = new_webhook_secret()
    client.secrets.append(WebhookSecret(secret=secret, created_at=now, expires_at=None))
    session.flush()
    return secret
