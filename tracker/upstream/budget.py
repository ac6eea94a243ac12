"""The upstream request budget, shared by every worker: at most TRACKER_UPSTREAM_RPS per token.

The budget is a schedule (GCRA): each request reserves the next free slot, slots
are 1/rps seconds apart, and a worker sleeps until its slot. A 429 from the
upstream pauses the whole token until its Retry-After, for at most `max_pause`
(TRACKER_MAX_POLL_INTERVAL): a stored pause found longer than that (written with
another bound, or by hand) is cut back to it when read, so no pause outlives its bound.
The schedule lives in Redis when the broker is Redis (one atomic script) and otherwise in the
`upstream_credentials` table (one short write transaction). Whether the upstream
rejected the token (401/403) is always kept in the database, where `/readyz` reads it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, cast

import redis
from sqlalchemy import Table, func, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tracker.clock import utcnow
from tracker.config import DEFAULT_MAX_POLL_INTERVAL
from tracker.db.engine import autocommit_engine, dialect_insert, is_postgresql
from tracker.db.models import UpstreamCredential
from tracker.errors import BudgetUnavailable
from tracker.observability.metrics import BUDGET_WAIT

log = logging.getLogger("tracker.upstream")

_CREDENTIALS = cast(Table, UpstreamCredential.__table__)

# Slots 5 % further apart than 1/rps: no one-second window sees more than rps
# (docs/decisions/0006-shared-request-budget.md).
SCHEDULE_MARGIN = 1.05


def credential_key(token: str | None) -> str:
    """A stable fingerprint of the upstream token: budgets are per token, and never store it."""
    return "tok_" + hashlib.sha256((token or "").encode()).hexdigest()[:24]


def redis_budget_keys(key: str) -> tuple[str, str]:
    """The Redis keys of a token's budget: its schedule (next free slot) and its pause."""
    return f"tracker:budget:{key}:schedule", f"tracker:budget:{key}:paused"


@dataclass(frozen=True)
class BudgetState:
    """A token's budget as it stands, for people (the dashboard's overview).

    `queued_seconds`: how far ahead of now the next free request slot lies; above zero,
    every slot up to then is taken (the budget is fully in use). `paused_until`: a 429
    paused the token until then.
    """

    rps: float
    queued_seconds: float
    paused_until: datetime | None
    rejected_at: datetime | None
    rejected_reason: str | None


def read_budget_state(
    session: Session, key: str, *, rps: float, redis_url: str | None, now: datetime
) -> BudgetState:
    """The budget of the token `key` (a `credential_key`), from Redis when the workers keep
    it there (`redis_url`), else from `upstream_credentials`; rejection is always in the
    database. Reads only; a Redis that does not answer reads as an idle budget."""
    row = session.get(UpstreamCredential, key)
    next_slot = row.next_request_at if row is not None else None
    paused = row.paused_until if row is not None else None
    if redis_url:
        try:
            conn = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
            with conn:
                schedule, pause = conn.mget(list(redis_budget_keys(key)))
        except redis.RedisError:
            schedule = pause = None
        next_slot = datetime.fromtimestamp(float(schedule), UTC) if schedule is not None else None
        paused = datetime.fromtimestamp(float(pause), UTC) if pause is not None else None
    queued = max(0.0, (next_slot - now).total_seconds()) if next_slot is not None else 0.0
    return BudgetState(
        rps=rps,
        queued_seconds=queued,
        paused_until=paused if paused is not None and paused > now else None,
        rejected_at=row.rejected_at if row is not None else None,
        rejected_reason=row.rejected_reason if row is not None else None,
    )


class Budget(Protocol):
    interval: float  # seconds between two slots

    def reserve(self, *, max_wait: float, count: int = 1) -> float:
        """Reserve the next `count` request slots, `interval` apart; seconds to wait for the
        first. Raises BudgetUnavailable."""

    def pause(self, seconds: float) -> None:
        """Hold every request of this token for `seconds` (the upstream said 429), at most
        the budget's `max_pause`."""


def bounded_pause(seconds: float, max_pause: float) -> float:
    """`seconds` within [0, max_pause]; infinite or not a number: `max_pause`."""
    if not math.isfinite(seconds):
        return max_pause
    return min(max(seconds, 0.0), max_pause)


def _log_cut_pause(key: str, left: float, max_pause: float) -> None:
    log.warning(
        "the stored 429 pause of upstream token %s had %.0f s left, more than the %g s "
        "allowed (TRACKER_MAX_POLL_INTERVAL); cut back to %g s",
        key,
        left,
        max_pause,
        max_pause,
    )


class RedisBudget:
    """The schedule in Redis: exact across processes, one round trip per request."""

    # KEYS: schedule, pause. ARGV: interval, max_wait, count, max_pause (seconds).
    # Returns the wait in seconds as a string, or "-<seconds>" when refused. A pause
    # longer than max_pause is cut back to it first.
    _RESERVE = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
    local paused = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
    local bound = now + tonumber(ARGV[4])
    if paused > bound then
      redis.call('SET', KEYS[2], tostring(bound), 'EX', 3600)
      return '-' .. tostring(bound - now) .. ':cut:' .. tostring(paused - now)
    end
    if paused > now then return '-' .. tostring(paused - now) end
    local slot = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
    local wait = slot - now
    if wait > tonumber(ARGV[2]) then return '-' .. tostring(wait) end
    redis.call('SET', KEYS[1], tostring(slot + tonumber(ARGV[1]) * tonumber(ARGV[3])), 'EX', 3600)
    return tostring(wait)
    """
    # KEYS: pause. ARGV: seconds, max_pause. A longer pause stands, unless it is
    # longer than max_pause from now.
    _PAUSE = """
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
    local untl = now + tonumber(ARGV[1])
    local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
    if untl > cur or cur > now + tonumber(ARGV[2]) then
      redis.call('SET', KEYS[1], tostring(untl), 'EX', 3600)
    end
    return tostring(untl)
    """

    def __init__(
        self, url: str, key: str, rps: float, *, max_pause: float = DEFAULT_MAX_POLL_INTERVAL
    ) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._key = key
        self._keys = list(redis_budget_keys(key))
        self.interval = SCHEDULE_MARGIN / rps
        self.max_pause = max_pause
        self._reserve = self._redis.register_script(self._RESERVE)
        self._pause = self._redis.register_script(self._PAUSE)

    def reserve(self, *, max_wait: float, count: int = 1) -> float:
        answer = self._reserve(
            keys=self._keys, args=[self.interval, max_wait, count, self.max_pause]
        )
        if b":cut:" in answer:
            answer, _, left = answer.partition(b":cut:")
            _log_cut_pause(self._key, float(left), self.max_pause)
        wait = float(answer)
        if wait < 0 or answer.startswith(b"-"):
            raise BudgetUnavailable(
                f"no upstream request slot within {max_wait:.1f}s",
                retry_at=utcnow() + timedelta(seconds=abs(wait)),
            )
        return wait

    def pause(self, seconds: float) -> None:
        self._pause(
            keys=[self._keys[1]], args=[bounded_pause(seconds, self.max_pause), self.max_pause]
        )


class DatabaseBudget:
    """The schedule in `upstream_credentials`: for the embedded broker, no Redis needed."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        key: str,
        rps: float,
        *,
        max_pause: float = DEFAULT_MAX_POLL_INTERVAL,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._key = key
        self.interval = SCHEDULE_MARGIN / rps
        self.max_pause = max_pause
        self._clock = clock
        # PostgreSQL takes a slot in one autocommitted statement (no session).
        self._autocommit = autocommit_engine(sessions)

    def reserve(self, *, max_wait: float, count: int = 1) -> float:
        wait = self._reserve_in_one_statement(max_wait, count)
        if wait is not None:
            return wait
        with self._sessions.begin() as session:
            now = self._clock()
            row = _locked_credential(session, self._key, now)
            bound = now + timedelta(seconds=self.max_pause)
            if row.paused_until is not None and row.paused_until > bound:
                _log_cut_pause(self._key, (row.paused_until - now).total_seconds(), self.max_pause)
                row.paused_until = bound
            if row.paused_until is not None and row.paused_until > now:
                raise BudgetUnavailable(
                    "upstream token paused after a 429", retry_at=row.paused_until
                )
            slot = max(row.next_request_at, now)
            wait = (slot - now).total_seconds()
            if wait > max_wait:
                raise BudgetUnavailable(
                    f"no upstream request slot within {max_wait:.1f}s", retry_at=slot
                )
            row.next_request_at = slot + timedelta(seconds=self.interval * count)
            return wait

    def _reserve_in_one_statement(self, max_wait: float, count: int) -> float | None:
        """PostgreSQL: take the next slot with one autocommitted UPDATE, the common case.

        None when the row does not exist yet, the token is paused, the slot is too far
        out or the statement failed (a connection the server dropped): the locking
        transaction above then decides (and says why).
        """
        if self._autocommit is None:
            return None
        now = self._clock()
        reserved = timedelta(seconds=self.interval * count)
        credential = _CREDENTIALS.c
        try:
            with self._autocommit.connect() as connection:
                slot: datetime | None = connection.scalar(
                    update(_CREDENTIALS)
                    .where(
                        credential.key == self._key,
                        or_(credential.paused_until.is_(None), credential.paused_until <= now),
                        credential.next_request_at <= now + timedelta(seconds=max_wait),
                    )
                    .values(
                        next_request_at=func.greatest(credential.next_request_at, now) + reserved
                    )
                    .returning(credential.next_request_at)
                )
        except OperationalError:  # a connection the server dropped
            return None
        if slot is None:
            return None
        return max(0.0, (slot - reserved - now).total_seconds())

    def pause(self, seconds: float) -> None:
        with self._sessions.begin() as session:
            now = self._clock()
            row = _locked_credential(session, self._key, now)
            until = now + timedelta(seconds=bounded_pause(seconds, self.max_pause))
            bound = now + timedelta(seconds=self.max_pause)
            if row.paused_until is None or not until <= row.paused_until <= bound:
                row.paused_until = until


def _locked_credential(session: Session, key: str, now: datetime) -> UpstreamCredential:
    """The credential row, locked for this transaction; created on first use."""
    session.execute(
        dialect_insert(session)(UpstreamCredential)
        .values(key=key, next_request_at=now)
        .on_conflict_do_nothing(index_elements=["key"])
    )
    query = select(UpstreamCredential).where(UpstreamCredential.key == key)
    if is_postgresql(session):
        query = query.with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one()


def wait_for_slot(
    budget: Budget, *, max_wait: float, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Block until this caller's request slot has come: the next of those this thread
    reserved ahead (`slots_ahead`), or else one reserved now."""
    ahead: SlotsAhead | None = getattr(_threads, "ahead", None)
    wait = ahead.take() if ahead is not None else None
    if wait is None:
        wait = budget.reserve(max_wait=max_wait)
    BUDGET_WAIT.observe(wait)
    if wait > 0:
        sleep(wait)


class SlotsAhead:
    """Request slots reserved in one call, `interval` apart, handed out in order."""

    def __init__(self, first_at: float, interval: float, count: int) -> None:
        self._next_at, self._interval, self._left = first_at, interval, count

    def take(self) -> float | None:
        """Seconds to wait for the next slot; None when none is left."""
        if self._left <= 0:
            return None
        self._left -= 1
        wait = max(0.0, self._next_at - time.monotonic())
        self._next_at += self._interval
        return wait

    def drop(self) -> None:
        """Give up the slots not taken (they go unused): after upstream trouble (a 429
        pauses the token) each request asks the budget again."""
        self._left = 0


_threads = threading.local()


@contextmanager
def slots_ahead(budget: Budget, count: int, *, max_wait: float) -> Iterator[SlotsAhead | None]:
    """Reserve `count` request slots in one round trip for the requests this thread makes
    next (a poll job's batches), rather than one round trip per request. Yields None, and
    reserves nothing, if there is only one or the budget cannot give the first in time:
    each request then reserves its own, as without this."""
    ahead = None
    if count > 1:
        try:
            first_at = time.monotonic() + budget.reserve(max_wait=max_wait, count=count)
        except BudgetUnavailable:
            pass
        else:
            ahead = SlotsAhead(first_at, budget.interval, count)
    _threads.ahead = ahead
    try:
        yield ahead
    finally:
        _threads.ahead = None


def mark_rejected(session: Session, key: str, reason: str, *, now: datetime) -> bool:
    """Record that the upstream rejected the token; True if this is news (log it once)."""
    row = _locked_credential(session, key, now)
    news = row.rejected_at is None
    row.rejected_at, row.rejected_reason = now, reason
    return news


def clear_rejected(session: Session, key: str) -> bool:
    """The token works again; True if it had been rejected (read after every poll: kept cheap)."""
    credential = _CREDENTIALS.c
    rejected = session.connection().scalar(
        select(credential.rejected_at).where(credential.key == key)
    )
    if rejected is None:
        return False
    session.execute(
        update(UpstreamCredential)
        .where(credential.key == key)
        .values(rejected_at=None, rejected_reason=None)
    )
    return True


def rejected_since(session: Session, key: str) -> datetime | None:
    row = session.get(UpstreamCredential, key)
    return None if row is None else row.rejected_at


def rejected_credentials(session: Session) -> dict[str, datetime]:
    """Fingerprint -> when the upstream last rejected it, for every token it rejects now."""
    credential = _CREDENTIALS.c
    rows = session.connection().execute(
        select(credential.key, credential.rejected_at).where(credential.rejected_at.is_not(None))
    )
    return {key: rejected_at for key, rejected_at in rows if rejected_at is not None}
