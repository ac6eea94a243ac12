"""Dashboard sign-ins: sessions and one-time sign-in links, kept in `dashboard_sessions`.

The browser holds a random token in an `HttpOnly` cookie; the database holds only its
SHA-256, with the client and the client's API key hash at sign-in time. A session ends
when it expires, on sign-out, or when the client's API key changes (a revoked key
signs out every browser that used it). Every API process reads the same table, so a
session works whichever process answers.

A sign-in link (`tracker demo`, `tracker clients sign-in-link`) is a row of its own
kind: single use (redeeming deletes it in the same statement that reads it) and
short-lived. It carries a token, never an API key.

The CSRF token of a session is an HMAC of the session token: nothing more to store,
unknown to anyone without the cookie, and different for every session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from tracker.config import DASHBOARD_SESSION_SECONDS, DASHBOARD_SIGN_IN_LINK_SECONDS
from tracker.db.models import (
    DASHBOARD_SESSION,
    DASHBOARD_SIGN_IN_LINK,
    Client,
    DashboardSession,
)

# Tokens longer than this are not ours: no need to hash them.
MAX_TOKEN_LENGTH = 128


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_token(session_token: str) -> str:
    """The CSRF token that the forms of this session carry."""
    return hmac.new(session_token.encode(), b"tracker-dashboard-csrf", "sha256").hexdigest()


def csrf_matches(session_token: str, submitted: str) -> bool:
    """Whether a form's CSRF token is this session's, compared in constant time."""
    return hmac.compare_digest(csrf_token(session_token), submitted)


def _add(session: Session, client: Client, kind: str, *, now: datetime, seconds: int) -> str:
    token = secrets.token_urlsafe(32)
    session.add(
        DashboardSession(
            id=_digest(token),
            kind=kind,
            client_id=client.id,
            api_key_hash=client.api_key_hash,
            created_at=now,
            expires_at=now + timedelta(seconds=seconds),
        )
    )
    session.flush()
    return token


def start_session(
    session: Session, client: Client, *, now: datetime, seconds: int = DASHBOARD_SESSION_SECONDS
) -> str:
    """Sign `client` in: a new session's token, for the cookie. Expired rows are cleared."""
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
    return _add(session, client, DASHBOARD_SESSION, now=now, seconds=seconds)


def session_client(session: Session, token: str, *, now: datetime) -> Client | None:
    """The client signed in with `token`, or None (unknown, expired, or its key changed)."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    return session.scalar(
        select(Client)
        .join(DashboardSession, DashboardSession.client_id == Client.id)
        .where(
            DashboardSession.id == _digest(token),
            DashboardSession.kind == DASHBOARD_SESSION,
            DashboardSession.expires_at > now,
            DashboardSession.api_key_hash == Client.api_key_hash,
        )
    )


def end_session(session: Session, token: str) -> None:
    """Sign out: the session's row goes (nothing happens for an unknown token)."""
    if token and len(token) <= MAX_TOKEN_LENGTH:
        session.execute(
            delete(DashboardSession).where(
                DashboardSession.id == _digest(token), DashboardSession.kind == DASHBOARD_SESSION
            )
        )


def create_sign_in_link_token(
    session: Session,
    client: Client,
    *,
    now: datetime,
    seconds: int = DASHBOARD_SIGN_IN_LINK_SECONDS,
) -> str:
    """A one-time token that signs `client` in at `/ui/login?token=...` within `seconds`."""
    return _add(session, client, DASHBOARD_SIGN_IN_LINK, now=now, seconds=seconds)


def redeem_sign_in_link(session: Session, token: str, *, now: datetime) -> Client | None:
    """The client a sign-in link names, or None; the link is used up either way it was valid.

    One DELETE ... RETURNING takes the row, so two browsers opening the same link at once
    cannot both sign in with it.
    """
    if not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    taken = session.execute(
        delete(DashboardSession)
        .where(
            DashboardSession.id == _digest(token), DashboardSession.kind == DASHBOARD_SIGN_IN_LINK
        )
        .returning(
            DashboardSession.client_id, DashboardSession.api_key_hash, DashboardSession.expires_at
        )
    ).first()
    if taken is None or taken.expires_at <= now:
        return None
    client = session.get(Client, taken.client_id)
    if client is None or client.api_key_hash != taken.api_key_hash:
        return None
    return client
