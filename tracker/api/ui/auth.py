"""Dashboard sign-in and sign-out, the session cookie, and CSRF checks.

Sign-in takes the client's API key once, in a form; the key is checked as the API
checks it and never kept: the browser gets a random session token in a cookie that is
`HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page sends it),
`Secure` when the dashboard is served over https, and scoped to `/ui`. The sign-in
form itself carries a CSRF token bound to a cookie of its own (double submit), so
another site cannot sign a browser in to an account of its choosing.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from tracker.api.deps import request_transaction
from tracker.api.ui.render import page
from tracker.api.ui.sessions import (
    csrf_matches,
    end_session,
    redeem_sign_in_link,
    session_client,
    start_session,
)
from tracker.clock import utcnow
from tracker.config import DASHBOARD_SESSION_SECONDS
from tracker.db.models import Client
from tracker.errors import CsrfRefused, SignInRequired
from tracker.tracking.clients import authenticate

SESSION_COOKIE = "tracker_session"
SIGN_IN_CSRF_COOKIE = "tracker_sign_in"
COOKIE_PATH = "/ui"
HOME = "/ui/"
# Longer fields are not ours: refused before any work.
_MAX_FIELD = 512

router = APIRouter(prefix="/ui", include_in_schema=False)


def safe_next(target: str | None) -> str:
    """`target` if it is a dashboard path on this site, else the overview.

    Only `/ui...` paths: no scheme, no host, no `//` or backslash tricks that a browser
    would read as another site.
    """
    if not target or len(target) > 2048 or "\\" in target or any(ord(c) < 32 for c in target):
        return HOME
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or target.startswith("//"):
        return HOME
    if parts.path != "/ui" and not parts.path.startswith("/ui/"):
        return HOME
    if parts.path.startswith(("/ui/login", "/ui/logout", "/ui/static/")):
        return HOME
    return target


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


@contextmanager
def signed_in(request: Request) -> Iterator[tuple[Session, Client, str]]:
    """The request's transaction, the signed-in client and its session token.

    Raises SignInRequired without a valid session; the dashboard's handler sends the
    browser to the sign-in page and back here afterwards.
    """
    token = request.cookies.get(SESSION_COOKIE, "")
    with request_transaction(request) as session:
        client = session_client(session, token, now=utcnow())
        if client is None:
            raise SignInRequired(
                "your session has ended; sign in again" if token else "sign in to continue",
                code="session_expired" if token else "sign_in_required",
            )
        yield session, client, token


def require_csrf(token: str, submitted: str) -> None:
    """Refuse a form whose CSRF token is not this session's: CsrfRefused, a 403 page."""
    if not submitted or len(submitted) > _MAX_FIELD or not csrf_matches(token, submitted):
        raise CsrfRefused(
            "this form is not from your dashboard session (its CSRF token is missing or "
            "stale); reload the page and try again"
        )


def sign_in_page(
    request: Request,
    *,
    next_path: str,
    message: str | None = None,
    notice: str | None = None,
    status_code: int = 200,
) -> Response:
    """The sign-in form, with a fresh CSRF token bound to its cookie."""
    form_token = secrets.token_urlsafe(24)
    response = page(
        "login.html",
        {
            "title": "Sign in",
            "client": None,
            "csrf": form_token,
            "next_path": next_path,
            "message": message,
            "notice": notice,
            "nav": "",
        },
        status_code=status_code,
    )
    response.set_cookie(
        SIGN_IN_CSRF_COOKIE,
        form_token,
        max_age=3600,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


def _signed_in_response(request: Request, token: str, target: str) -> Response:
    # A page that moves on by itself rather than a redirect: a link opened from another
    # application or site starts a cross-site navigation, and only a navigation that this
    # page starts sends the new SameSite=Strict cookie.
    response = page("signed_in.html", {"title": "Signed in", "client": None, "next_path": target})
    return _with_session_cookie(response, token, request)


def _with_session_cookie(response: Response, token: str, request: Request) -> Response:
    """The signed-in answer: the session cookie (HttpOnly, SameSite=Strict, Secure over
    https, scoped to /ui), and the sign-in form's CSRF cookie gone."""
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=DASHBOARD_SESSION_SECONDS,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(SIGN_IN_CSRF_COOKIE, path=COOKIE_PATH)
    return response


@router.get("/login")
def login_form(
    request: Request, next: str | None = None, token: str | None = None, ended: str | None = None
) -> Response:
    """The sign-in page; with `token`, a one-time sign-in link is redeemed instead."""
    target = safe_next(next)
    if token is not None:
        with request_transaction(request) as session:
            client = redeem_sign_in_link(session, token[:_MAX_FIELD], now=utcnow())
            if client is not None:
                session_token = start_session(session, client, now=utcnow())
        if client is None:
            message = (
                "This sign-in link is not valid: it was used already or has expired. "
                "Sign in with your API key, or ask for a new link."
            )
            return sign_in_page(request, next_path=target, message=message, status_code=401)
        return _signed_in_response(request, session_token, target)
    notices = {
        "expired": "Your session has ended. Sign in again to continue where you were.",
        "signed_out": "You are signed out.",
    }
    return sign_in_page(request, next_path=target, notice=notices.get(ended or ""))


@router.post("/login")
def login(
    request: Request,
    api_key: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = HOME,
) -> Response:
    """Check the API key; on success start a session and go where the user was headed."""
    target = safe_next(next)
    expected = request.cookies.get(SIGN_IN_CSRF_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, csrf_token[:_MAX_FIELD]):
        message = "The sign-in form had expired. Enter your API key again."
        return sign_in_page(request, next_path=target, message=message, status_code=403)
    api_key = api_key.strip()
    if not api_key:
        message = "Enter the client's API key (it starts with trk_)."
        return sign_in_page(request, next_path=target, message=message, status_code=401)
    with request_transaction(request) as session:
        client = authenticate(session, api_key) if len(api_key) <= _MAX_FIELD else None
        token = start_session(session, client, now=utcnow()) if client is not None else None
    if token is None:
        message = (
            "That API key is not valid: it is mistyped, or it was revoked. Use the key "
            "`tracker clients create` printed for your client."
        )
        return sign_in_page(request, next_path=target, message=message, status_code=401)
    response = RedirectResponse(target, status_code=303)
    return _with_session_cookie(response, token, request)


@router.post("/logout")
def logout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    """End the session everywhere (its row goes) and forget the cookie."""
    with signed_in(request) as (session, _client, token):
        require_csrf(token, csrf_token)
        end_session(session, token)
    response = RedirectResponse("/ui/login?ended=signed_out", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


def sign_in_required_response(request: Request, exc: SignInRequired) -> Response:
    """Where a request without a valid session goes: the sign-in page, and back after.

    The live JSON routes answer 401 JSON instead; the page's script then reloads, which
    leads here.
    """
    if request.url.path.startswith("/ui/live/"):
        response: Response = JSONResponse(
            {"error": {"code": exc.code, "message": exc.message}}, status_code=401
        )
    else:
        asked = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        target = safe_next(asked) if request.method == "GET" else HOME
        ended = "&ended=expired" if exc.code == "session_expired" else ""
        response = RedirectResponse(f"/ui/login?next={quote(target, safe='')}{ended}", 303)
    if exc.code == "session_expired":
        response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response
