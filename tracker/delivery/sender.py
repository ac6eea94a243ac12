"""Send one webhook request: vet the address, sign, POST within a deadline, keep the answer.

`send_webhook` never raises: every outcome, a refused address included, is a
`WebhookAnswer` for the attempt log. The database side is elsewhere: claims in
`tracker.delivery.outbox`, outcome rules and the retry schedule in `tracker.delivery.outcome`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from http.cookiejar import Cookie, CookiePolicy

import requests
import urllib3

from tracker.clock import parse_retry_after
from tracker.delivery.netguard import (
    AttemptDeadline,
    PinnedAddressAdapter,
    Resolver,
    system_resolver,
    vet_callback,
)
from tracker.delivery.signing import webhook_headers
from tracker.errors import CallbackRefused, UnresolvableHost

log = logging.getLogger("tracker.delivery")

# The attempt log keeps this much of each answer.
EXCERPT_BYTES = 2048
# Requests one worker process has in flight at once (its sending threads).
SEND_THREADS = 32
# Connections kept open per receiver address by one worker process: at least SEND_THREADS.
HTTP_POOL_SIZE = 64
RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class WebhookAnswer:
    """What one request got: a status code and excerpt, or an error; `refused` if never sent."""

    started_at: datetime
    duration_ms: int
    status_code: int | None = None
    excerpt: str | None = None
    error: str | None = None
    # Seconds, from a 429 or 503 answer, at most TRACKER_MAX_RETRY_AFTER.
    retry_after: float | None = None
    refused: CallbackRefused | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class RefuseAllCookies(CookiePolicy):
    """A cookie policy that keeps no cookie and sends none.

    Each attempt stands alone (docs/webhooks.md): a `Set-Cookie` from one receiver's
    answer must never ride along on a later webhook, of this client or another.
    """

    netscape = True
    rfc2965 = False
    hide_cookie2 = True

    def set_ok(self, cookie: Cookie, request: object) -> bool:
        return False

    def return_ok(self, cookie: Cookie, request: object) -> bool:
        return False

    def domain_return_ok(self, domain: str, request: object) -> bool:
        return False

    def path_return_ok(self, path: str, request: object) -> bool:
        return False


_http_lock = threading.Lock()
_http: requests.Session | None = None


def new_http_session() -> requests.Session:
    """An HTTP session that connects only to vetted addresses (`PinnedAddressAdapter`).

    It keeps nothing a receiver sets: no cookie (`RefuseAllCookies`), no credential
    from the environment. Its connections are pooled per vetted address (IP, port, TLS
    host name), which carries nothing a receiver sets at the HTTP level: a kept-alive
    connection goes back only to the address that answered on it, and one with
    anything left unread is dropped, not reused (docs/webhooks.md, "Each attempt stands
    alone").
    """
    session = requests.Session()
    session.cookies.set_policy(RefuseAllCookies())
    # Proxy variables and .netrc must not reroute or alter a vetted request.
    session.trust_env = False
    adapter = PinnedAddressAdapter(
        pool_connections=HTTP_POOL_SIZE, pool_maxsize=HTTP_POOL_SIZE, max_retries=0
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def http_session() -> requests.Session:
    """The worker process's pooled HTTP session for webhooks, created on first use."""
    global _http
    with _http_lock:
        if _http is None:
            _http = new_http_session()
        return _http


_send_pool: ThreadPoolExecutor | None = None


def send_pool() -> ThreadPoolExecutor:
    """The worker process's threads that send webhooks (`SEND_THREADS`), created on first use."""
    global _send_pool
    with _http_lock:
        if _send_pool is None:
            _send_pool = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="tracker-send")
        return _send_pool


def _forget_send_pool() -> None:
    global _send_pool
    _send_pool = None  # a forked child has none of its parent's threads


os.register_at_fork(after_in_child=_forget_send_pool)


def send_webhook(
    callback_url: str,
    msg_id: str,
    payload: str,
    secrets: Sequence[str],
    *,
    timeout: float,
    allow_private: bool,
    max_retry_after: float,
    http: requests.Session | None = None,
    resolver: Resolver | None = None,
    clock: Callable[[], datetime],
) -> WebhookAnswer:
    """POST `payload` to the vetted address of `callback_url`, signed, within `timeout` seconds.

    `http` must mount `PinnedAddressAdapter` (see `new_http_session`); default: the
    process's pooled session. A 429's or 503's `Retry-After` is kept, at most
    `max_retry_after` seconds.
    """
    started_at = clock()
    start = time.perf_counter()

    def elapsed_ms() -> int:
        return round((time.perf_counter() - start) * 1000)

    try:
        target = vet_callback(
            callback_url, allow_private=allow_private, resolver=resolver or system_resolver
        )
    except CallbackRefused as exc:
        return WebhookAnswer(started_at, elapsed_ms(), error=exc.message, refused=exc)
    except UnresolvableHost as exc:
        return WebhookAnswer(
            started_at, elapsed_ms(), error=f"{exc}; check the host name of the callback URL"
        )

    if not secrets:
        return WebhookAnswer(
            started_at,
            elapsed_ms(),
            error="the client has no webhook secret in force to sign with; "
            "create one with `tracker clients rotate-secret NAME`",
        )
    body = payload.encode()
    headers = webhook_headers(secrets, msg_id, int(started_at.timestamp()), body)
    headers["Host"] = target.host_header
    response: requests.Response | None = None
    complete = False
    excerpt = error = None
    with AttemptDeadline(timeout) as deadline:
        for address in target.addresses:
            try:
                response = (http or http_session()).post(
                    target.url_for(address),
                    data=body,
                    headers=headers,
                    auth=target.auth,
                    timeout=(timeout, timeout),
                    allow_redirects=False,
                    stream=True,
                )
                raw = response.raw.read(EXCERPT_BYTES + 1, decode_content=True)
                complete = len(raw) <= EXCERPT_BYTES
                excerpt = raw[:EXCERPT_BYTES].decode("utf-8", errors="replace")
                error = None
                break
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                error = _describe(exc, address, timeout)
                # Only a refused or unreachable address moves on to the next one
                # (`localhost` answering ::1 first to an IPv4-only receiver, say).
                if not _connect_failed(exc) or deadline.expired:
                    break
        if deadline.expired:
            error = _timeout_message(timeout)
    if response is None:
        return WebhookAnswer(started_at, elapsed_ms(), error=error)
    # A fully read answer gives its connection back to the pool; a longer one is dropped.
    if complete and error is None:
        response.raw.release_conn()
    else:
        response.close()

    code = response.status_code
    if error is None and 300 <= code < 400:
        error = (
            f"the receiver answered {code} (redirect to {response.headers.get('location')!r}); "
            "redirects are not followed: register the final URL as callback_url"
        )
    elif error is None and not 200 <= code < 300:
        error = f"the receiver answered {code}; it must answer 2xx to acknowledge the webhook"
    retry_after = None
    if code in RETRY_AFTER_STATUSES:
        retry_after, note = _bounded_retry_after(response, callback_url, max_retry_after, clock())
        if note is not None and error is not None:
            error = f"{error}; {note}"
    return WebhookAnswer(started_at, elapsed_ms(), code, excerpt, error, retry_after)


def _bounded_retry_after(
    response: requests.Response, callback_url: str, limit: float, now: datetime
) -> tuple[float | None, str | None]:
    """A receiver's Retry-After in seconds, at most `limit`, and what was done to it."""
    retry_after = parse_retry_after(response.headers.get("retry-after"), now=now, limit=limit)
    if retry_after is None:
        return None, None
    if retry_after.note is None:
        return retry_after.seconds, None
    taken = (
        f"clamped to {retry_after.seconds:g} s (TRACKER_MAX_RETRY_AFTER)"
        if retry_after.seconds is not None
        else "ignored: the retry schedule decides"
    )
    note = f"its Retry-After {retry_after.header!r} {retry_after.note}, {taken}"
    log.warning("the receiver at %s answered %d: %s", callback_url, response.status_code, note)
    return retry_after.seconds, note


def _timeout_message(timeout: float) -> str:
    return (
        f"no complete answer within {timeout:g} s (TRACKER_WEBHOOK_TIMEOUT); the receiver "
        "should answer 2xx at once and do slow work afterwards"
    )


def _connect_failed(exc: Exception) -> bool:
    """The request never reached the receiver: no connection could be opened."""
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)  # requests wraps urllib3's MaxRetryError
    return isinstance(exc, requests.exceptions.ConnectTimeout) or isinstance(
        reason, urllib3.exceptions.NewConnectionError
    )


def _describe(exc: Exception, address: str, timeout: float) -> str:
    """The attempt log's error text for a request that got no answer."""
    if isinstance(exc, requests.Timeout | urllib3.exceptions.TimeoutError):
        return _timeout_message(timeout)
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS failed with {address}: {exc}; the receiver needs a valid certificate"
    if isinstance(exc, requests.ConnectionError):
        return f"could not connect to {address}: {exc}; is the receiver running and reachable?"
    return f"request to {address} failed: {type(exc).__name__}: {exc}"
