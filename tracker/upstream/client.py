"""The AceData task API client: `retrieve` and `retrieve_batch` on `POST {base}/{service}/tasks`.

One pooled `requests.Session`; every request has a (connect, read) timeout and
follows no redirect. The vendor's error body
`{"success": false, "error": {"code", "message"}, "trace_id"}` becomes a typed
`tracker.errors.UpstreamError` carrying status, code, message and trace id:

    401/403                              UpstreamAuthError
    429                                  UpstreamRateLimited (with `retry_after`)
    5xx, timeout, connection error       UpstreamServerError
    3xx, other 4xx, a 2xx off the shape  UpstreamBadAnswer

429 and server errors are retried up to `max_retries` times with the vendor's
published backoff (1, 2, 4, 8, 16 s, +-20 % jitter), never sooner than a 429's
Retry-After; other 4xx are never retried. A Retry-After is read by
`tracker.clock.parse_retry_after` and bounded by `max_retry_after`
(TRACKER_MAX_POLL_INTERVAL): a larger, infinite or unreadable one is clamped and logged.
Records are matched by their `id`, never by position: the vendor does not promise order
or completeness.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from tracker import __version__
from tracker.clock import parse_retry_after, utcnow
from tracker.config import DEFAULT_MAX_POLL_INTERVAL, Settings
from tracker.errors import (
    BudgetUnavailable,
    UpstreamAuthError,
    UpstreamBadAnswer,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamServerError,
)
from tracker.observability import metrics

log = logging.getLogger("tracker.upstream")

VENDOR_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0)
BACKOFF_JITTER = 0.2
# Error codes that mean "no such task" on a single retrieve (the vendor does not document one).
NOT_FOUND_CODES = frozenset({"not_found", "task_not_found"})
EXCERPT_CHARS = 200

Record = dict[str, Any]


@dataclass(frozen=True)
class SubmitAnswer:
    """What a generation endpoint answered: its status and its body (JSON, or the text)."""

    status: int
    body: Any

    @property
    def accepted(self) -> bool:
        """A 2xx that is not the vendor's error body."""
        return 200 <= self.status < 300 and not _is_error_body(self.body)


class UpstreamClient:
    """Reads task records from one AceData base URL with one token."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_retries: int = 5,
        backoff: Sequence[float] = VENDOR_BACKOFF,
        max_batch: int = 50,
        max_retry_after: float = DEFAULT_MAX_POLL_INTERVAL,
        pool_size: int = 32,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        before_request: Callable[[], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch!r})")
        if not backoff:
            raise ValueError("backoff needs at least one delay, e.g. (1, 2, 4, 8, 16)")
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout, read_timeout)
        self.max_retries = max_retries
        self.backoff = tuple(backoff)
        self.max_batch = max_batch
        self.max_retry_after = max_retry_after
        self.sleep = sleep
        self.before_request = before_request
        self.headers = {
            "accept": "application/json",
            "content-type": "application/json",
            "user-agent": f"tracker/{__version__}",
        }
        if token is not None:
            self.headers["authorization"] = f"Bearer {token}"
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            # Proxy and CA bundle variables are read once, here, for the one base URL:
            # requests would re-read the whole environment on every request, a
            # noticeable share of a poll's CPU in a worker.
            environment = session.merge_environment_settings(self.base_url, {}, None, None, None)
            session.proxies.update(environment["proxies"])
            session.verify = environment["verify"]
            session.trust_env = False
        self.session = session

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> UpstreamClient:
        """A client for TRACKER_UPSTREAM_URL and its token; `kwargs` override the rest."""
        token = settings.upstream_bearer
        kwargs.setdefault("read_timeout", settings.upstream_timeout)
        kwargs.setdefault("max_batch", settings.batch_size)
        kwargs.setdefault("max_retry_after", settings.max_poll_interval)
        return cls(settings.upstream_url, token, **kwargs)

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def retrieve(self, service: str, task_id: str) -> Record | None:
        """One task record, or None if the upstream does not know the id."""
        try:
            answer = self._post(service, {"id": task_id, "action": "retrieve"})
        except UpstreamError as exc:
            # Unconfirmed how the vendor says "unknown id": `{}`, a 404 or a not_found code.
            if exc.status == 404 or exc.code in NOT_FOUND_CODES:
                return None
            raise
        if not isinstance(answer, dict):
            raise self._off_shape(service, "a task record (a JSON object)", answer)
        return answer if names_a_task(answer) else None

    def retrieve_batch(self, service: str, ids: Sequence[str]) -> dict[str, Record]:
        """The records of `ids` keyed by their `id`; ids the answer left out are absent.

        Each request asks for what it means: `limit` is the number of ids (some of the
        vendor's task endpoints page their answers, with default limits as small as 12).
        Ids missing from an answer with fewer items than asked are asked again at once,
        each request taking its own slot of the budget, until an answer brings none of
        them: a page cut short is not a miss. Should a re-ask fail, what the earlier
        answers brought is kept and the rest count as misses.
        """
        wanted = list(dict.fromkeys(ids))
        records: dict[str, Record] = {}
        for start in range(0, len(wanted), self.max_batch):
            chunk = wanted[start : start + self.max_batch]
            asked, answered = len(chunk), self._retrieve_chunk(service, chunk, records)
            missing = [task_id for task_id in chunk if task_id not in records]
            while missing and answered < asked:  # a short answer: ask for what it left out
                metrics.UPSTREAM_SHORT_ANSWERS.inc()
                try:
                    answered = self._retrieve_chunk(service, missing, records)
                except (UpstreamError, BudgetUnavailable):
                    break  # the earlier answers stand; the rest are misses this time
                still = [task_id for task_id in missing if task_id not in records]
                if len(still) == len(missing):
                    break  # the upstream has none of them: misses, not a page cut short
                asked, missing = len(missing), still
        return records

    def _retrieve_chunk(
        self, service: str, chunk: Sequence[str], records: dict[str, Record]
    ) -> int:
        """Ask for `chunk` once; add what came back to `records`; return the items answered."""
        body = {"ids": list(chunk), "action": "retrieve_batch", "limit": len(chunk)}
        answer = self._post(service, body)
        items = answer.get("items") if isinstance(answer, dict) else None
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise self._off_shape(service, '{"items": [task records], "count": N}', answer)
        asked = set(chunk)
        for item in items:
            if item.get("id") in asked:
                records[item["id"]] = item
        return len(items)

    def submit(self, service: str, endpoint: str, body: dict[str, Any]) -> SubmitAnswer:
        """POST a generation request to `{base}/{service}/{endpoint}`, once: a submission
        spends credits, so it is never retried. Any answer comes back as it is; only a
        timeout or a connection error raises (UpstreamServerError: whether the vendor
        started the task is then unknown)."""
        url = f"{self.base_url}/{service}/{endpoint}"
        started = time.perf_counter()
        try:
            response = self._raw_post(url, body)
        finally:
            metrics.UPSTREAM_LATENCY.labels(action="submit").observe(time.perf_counter() - started)
        with response:
            try:
                answer: Any = response.json()
            except ValueError:
                answer = response.text[:EXCERPT_CHARS]
            result = SubmitAnswer(response.status_code, answer)
        outcome = "ok" if result.accepted else f"http_{result.status}"
        metrics.UPSTREAM_REQUESTS.labels(action="submit", outcome=outcome).inc()
        return result

    def _post(self, service: str, body: dict[str, Any]) -> Any:
        url = f"{self.base_url}/{service}/tasks"
        retries = 0
        while True:
            try:
                return self._attempt(url, body)
            except (UpstreamRateLimited, UpstreamServerError) as exc:
                if retries >= self.max_retries:
                    raise
                self.sleep(self._retry_delay(retries, exc))
                retries += 1

    def _retry_delay(self, retries: int, exc: UpstreamError) -> float:
        base = self.backoff[min(retries, len(self.backoff) - 1)]
        delay = base * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)
        if isinstance(exc, UpstreamRateLimited) and exc.retry_after is not None:
            delay = max(delay, exc.retry_after)
        return delay

    def _attempt(self, url: str, body: dict[str, Any]) -> Any:
        if self.before_request is not None:
            self.before_request()
        action = str(body.get("action"))
        started = time.perf_counter()
        try:
            answer = self._send(url, body)
        except UpstreamError as exc:
            metrics.UPSTREAM_REQUESTS.labels(action=action, outcome=exc.code).inc()
            raise
        finally:
            metrics.UPSTREAM_LATENCY.labels(action=action).observe(time.perf_counter() - started)
        metrics.UPSTREAM_REQUESTS.labels(action=action, outcome="ok").inc()
        return answer

    def _send(self, url: str, body: dict[str, Any]) -> Any:
        response = self._raw_post(url, body)
        with response:
            return _parse_answer(url, response, max_retry_after=self.max_retry_after)

    def _raw_post(self, url: str, body: dict[str, Any]) -> requests.Response:
        """One POST, no redirect followed; transport failures as UpstreamServerError."""
        try:
            return self.session.post(
                url, json=body, headers=self.headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.Timeout as exc:
            raise UpstreamServerError(
                f"{url} did not answer within {self.timeout} s (connect, read) ({exc}); "
                "retry later, or raise TRACKER_UPSTREAM_TIMEOUT if answers are just slow",
                code="timeout",
            ) from exc
        except requests.RequestException as exc:
            raise UpstreamServerError(
                f"could not reach {url} ({exc}); check TRACKER_UPSTREAM_URL and the network",
                code="connection_error",
            ) from exc

    def _off_shape(self, service: str, expected: str, answer: Any) -> UpstreamBadAnswer:
        return UpstreamBadAnswer(
            f"{self.base_url}/{service}/tasks answered {_excerpt(answer)} where {expected} was "
            "expected; check that TRACKER_UPSTREAM_URL points at the AceData task API",
            status=200,
        )


def names_a_task(answer: dict[str, Any]) -> bool:
    """A single `retrieve` answered a task, not "no such task" (`{}`): a record with its
    `id`, a flat answer with its `task_id` (captcha), or MiniMax's `{"task": {"id"}}`."""
    task = answer.get("task")
    return bool(
        answer.get("id") or answer.get("task_id") or (isinstance(task, dict) and task.get("id"))
    )


def _parse_answer(url: str, response: requests.Response, *, max_retry_after: float) -> Any:
    """The JSON body of a 2xx answer; any other answer raised as its typed error."""
    status = response.status_code
    if 200 <= status < 300:
        try:
            answer = response.json()
        except ValueError:
            raise UpstreamBadAnswer(
                f"{url} answered {status} with a body that is not JSON "
                f"({_excerpt(response.text)}); check TRACKER_UPSTREAM_URL",
                status=status,
            ) from None
        if _is_error_body(answer):  # an error wrapped in a 2xx: not a record either
            code, message, trace_id = _vendor_error(answer)
            raise UpstreamBadAnswer(
                f"{url} answered {status} with error {code}: {message}",
                code=code,
                status=status,
                trace_id=trace_id,
            )
        return answer
    try:
        code, message, trace_id = _vendor_error(response.json())
    except ValueError:
        code, message, trace_id = None, _excerpt(response.text), None
    said = f"{url} answered {status}" + (f" {code}" if code else "") + f": {message}"
    details: dict[str, Any] = {"code": code, "status": status, "trace_id": trace_id}
    if status in (401, 403):
        raise UpstreamAuthError(
            f"{said}; the token was rejected: check TRACKER_UPSTREAM_TOKEN", **details
        )
    if status == 429:
        retry_after = _bounded_retry_after(url, response, max_retry_after)
        wait = f"retry after {retry_after:g} s" if retry_after is not None else "slow down"
        raise UpstreamRateLimited(
            f"{said}; {wait}, or lower TRACKER_UPSTREAM_RPS if this persists",
            retry_after=retry_after,
            **details,
        )
    if status >= 500:
        raise UpstreamServerError(f"{said}; the upstream is in trouble, retry later", **details)
    if 300 <= status < 400:
        location = response.headers.get("location")
        raise UpstreamBadAnswer(
            f"{url} answered {status}, a redirect to {location!r}, and redirects are not "
            "followed: point TRACKER_UPSTREAM_URL at the final address",
            **details,
        )
    raise UpstreamBadAnswer(f"{said}; the request was refused and will not be retried", **details)


def _is_error_body(answer: Any) -> bool:
    return (
        isinstance(answer, dict)
        and answer.get("success") is False
        and isinstance(answer.get("error"), dict)
        and "id" not in answer
        and "items" not in answer
    )


def _vendor_error(body: Any) -> tuple[str | None, str, str | None]:
    """(code, message, trace_id) of the vendor's error body, whatever of it is there."""
    if not isinstance(body, dict):
        return None, _excerpt(body), None
    error = body.get("error")
    trace_id = body.get("trace_id")
    trace = trace_id if isinstance(trace_id, str) else None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        return (
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else _excerpt(error),
            trace,
        )
    return None, _excerpt(body), trace


def _bounded_retry_after(url: str, response: requests.Response, limit: float) -> float | None:
    """The 429's Retry-After in seconds, at most `limit`; None without a readable one."""
    retry_after = parse_retry_after(response.headers.get("retry-after"), now=utcnow(), limit=limit)
    if retry_after is None:
        return None
    if retry_after.note is not None:
        taken = (
            f"clamped to {retry_after.seconds:g} s (TRACKER_MAX_POLL_INTERVAL)"
            if retry_after.seconds is not None
            else "ignored"
        )
        log.warning(
            "%s answered 429 with Retry-After %r, which %s; %s",
            url,
            retry_after.header,
            retry_after.note,
            taken,
        )
    return retry_after.seconds


def _excerpt(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:EXCERPT_CHARS] + ("…" if len(text) > EXCERPT_CHARS else ""))
