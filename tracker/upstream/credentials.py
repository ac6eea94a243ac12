"""Which upstream token a client's requests use: its own (stored encrypted) or the tracker's.

A client's own AceData token is stored encrypted with Fernet (AES-128-CBC and
HMAC-SHA256, from `cryptography`) under TRACKER_SECRET_KEY, beside its
fingerprint (`credential_key`): polling groups and budgets by the fingerprint and
decrypts a token only in the process that sends with it. TRACKER_SECRET_KEY may
hold several keys, comma-separated: the first encrypts, every one decrypts, so
keys rotate without downtime (`reencrypt_client_tokens`, docs/configuration.md).
A token is never logged, printed or answered; every token a process decrypts is
registered with the log filter (`tracker.observability.logs.register_secret`).

Functions take a session and do not commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select
from sqlalchemy.orm import Session

from tracker.config import Settings
from tracker.db.models import Client
from tracker.errors import TokenUnavailable
from tracker.observability.logs import register_secret
from tracker.upstream.budget import credential_key

log = logging.getLogger("tracker.upstream")

GENERATE_KEY_HINT = (
    "make one with `python -c 'from cryptography.fernet import Fernet; "
    "print(Fernet.generate_key().decode())'`"
)
MAX_TOKEN_LENGTH = 4096


def token_cipher(settings: Settings) -> MultiFernet:
    """The Fernet keys of TRACKER_SECRET_KEY, the first encrypting; TokenUnavailable if unset
    or not Fernet keys."""
    keys = settings.secret_keys
    if not keys:
        raise TokenUnavailable(
            "TRACKER_SECRET_KEY is not set, and clients' own upstream tokens are stored "
            f"encrypted with it; {GENERATE_KEY_HINT} and set it on every tracker process"
        )
    fernets = []
    for position, key in enumerate(keys, start=1):
        try:
            fernets.append(Fernet(key.encode()))
        except (ValueError, TypeError):
            raise TokenUnavailable(
                f"TRACKER_SECRET_KEY: key {position} of {len(keys)} is not a Fernet key "
                f"(32 url-safe base64-encoded bytes, {len(key)} characters given); "
                f"{GENERATE_KEY_HINT}"
            ) from None
    return MultiFernet(fernets)


def check_token(token: str) -> str:
    """The token as it will be sent, or ValueError saying what is wrong with it."""
    token = token.strip()
    if not token:
        raise ValueError("the token is empty; pipe the AceData token to standard input")
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"the token is {len(token)} characters, more than {MAX_TOKEN_LENGTH}")
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError("the token contains white space or control characters")
    return token


def set_client_token(session: Session, client: Client, token: str, *, settings: Settings) -> str:
    """Store `client`'s own upstream token, encrypted; returns its fingerprint (credential)."""
    token = check_token(token)
    client.upstream_token_ciphertext = token_cipher(settings).encrypt(token.encode()).decode()
    client.upstream_credential = credential_key(token)
    session.flush()
    return client.upstream_credential


def clear_client_token(session: Session, client: Client) -> bool:
    """Forget `client`'s own token (its tasks are polled with the tracker's); True if it had one."""
    had = client.upstream_token_ciphertext is not None
    client.upstream_token_ciphertext = None
    client.upstream_credential = None
    session.flush()
    return had


def reencrypt_client_tokens(session: Session, *, settings: Settings) -> int:
    """Encrypt every stored token again with the first key of TRACKER_SECRET_KEY (after a
    rotation); returns how many. TokenUnavailable if a token no key decrypts."""
    cipher = token_cipher(settings)
    clients = session.scalars(
        select(Client).where(Client.upstream_token_ciphertext.is_not(None))
    ).all()
    for client in clients:
        assert client.upstream_token_ciphertext is not None
        try:
            rotated = cipher.rotate(client.upstream_token_ciphertext.encode())
        except InvalidToken:
            raise TokenUnavailable(
                f"no key of TRACKER_SECRET_KEY decrypts the upstream token of client "
                f"{client.name!r}; add the key it was stored with, or set the token again"
            ) from None
        client.upstream_token_ciphertext = rotated.decode()
    session.flush()
    return len(clients)


def decrypt_token(ciphertext: str, *, settings: Settings, owner: str) -> str:
    """A stored token in clear; TokenUnavailable naming `owner` if no key decrypts it."""
    try:
        return token_cipher(settings).decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise TokenUnavailable(
            f"no key of TRACKER_SECRET_KEY decrypts the upstream token of {owner}; set "
            "TRACKER_SECRET_KEY to the key it was stored with (or keep that key after the "
            "new one during a rotation), or set the token again"
        ) from None


@dataclass(frozen=True)
class Credential:
    """A token to send upstream and its fingerprint (the budget's and the claims' key)."""

    key: str
    token: str | None


def tracker_credential(settings: Settings) -> Credential:
    """The tracker's own token, TRACKER_UPSTREAM_TOKEN."""
    token = settings.upstream_bearer
    return Credential(credential_key(token), token)


def client_credential(client: Client, *, settings: Settings) -> Credential:
    """What `client`'s requests send: its own token if it has one, else the tracker's."""
    if client.upstream_token_ciphertext is None or client.upstream_credential is None:
        return tracker_credential(settings)
    token = decrypt_token(
        client.upstream_token_ciphertext, settings=settings, owner=f"client {client.name!r}"
    )
    register_secret(token)
    return Credential(client.upstream_credential, token)


def credential_by_key(session: Session, key: str, *, settings: Settings) -> Credential | None:
    """The credential with this fingerprint: the tracker's, or a client's (decrypted); None
    when no client holds that token any more."""
    tracker = tracker_credential(settings)
    if key == tracker.key:
        return tracker
    row = session.execute(
        select(Client.name, Client.upstream_token_ciphertext)
        .where(Client.upstream_credential == key, Client.upstream_token_ciphertext.is_not(None))
        .limit(1)
    ).first()
    if row is None or row.upstream_token_ciphertext is None:
        return None
    token = decrypt_token(
        row.upstream_token_ciphertext, settings=settings, owner=f"client {row.name!r}"
    )
    register_secret(token)
    return Credential(key, token)


def client_credentials(session: Session) -> dict[int, str]:
    """client id -> fingerprint of its own token, for the clients that have one."""
    rows = session.execute(
        select(Client.id, Client.upstream_credential).where(Client.upstream_credential.is_not(None))
    )
    return {client_id: key for client_id, key in rows if key is not None}
