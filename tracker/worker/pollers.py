"""What a worker process polls with: a client and request budget per token, shared by its jobs.

`WorkerContext` (`worker_context`, one per process) holds the settings, the sessions
and the `Pollers`: the tracker's token's and each client token's `Poller`, made on
first use (`make_poller`). `poll_with_tokens` polls a job's batches, each with its
token's poller, giving back those whose token cannot poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from tracker.clock import utcnow
from tracker.config import Settings, get_settings
from tracker.db.engine import make_engine, session_factory
from tracker.errors import TokenUnavailable
from tracker.polling import MAX_BUDGET_WAIT, PollBatch, PollOutcome, release_batch, run_poll_job
from tracker.upstream.budget import (
    Budget,
    DatabaseBudget,
    RedisBudget,
    mark_rejected,
    wait_for_slot,
)
from tracker.upstream.client import UpstreamClient
from tracker.upstream.credentials import Credential, credential_by_key, tracker_credential
from tracker.worker.roles import DEFAULT_CONCURRENCY

log = logging.getLogger("tracker.jobs")


@dataclass(frozen=True)
class Poller:
    """What polls with one token: its client (pooled connections) and its request budget."""

    credential: str
    upstream: UpstreamClient
    budget: Budget


def make_poller(
    settings: Settings,
    sessions: sessionmaker[Session],
    credential: Credential,
    *,
    max_wait: float = MAX_BUDGET_WAIT,
) -> Poller:
    """A client and budget for one token: each token has a request budget of its own. A
    request waits at most `max_wait` s for its slot (else BudgetUnavailable)."""
    budget: Budget
    if settings.broker_url and settings.broker_url.startswith(("redis://", "rediss://")):
        budget = RedisBudget(
            settings.broker_url,
            credential.key,
            settings.upstream_rps,
            max_pause=settings.max_poll_interval,
        )
    else:
        budget = DatabaseBudget(
            sessions, credential.key, settings.upstream_rps, max_pause=settings.max_poll_interval
        )
    upstream = UpstreamClient(
        settings.upstream_url,
        credential.token,
        read_timeout=settings.upstream_timeout,
        max_batch=settings.batch_size,
        max_retry_after=settings.max_poll_interval,
        max_retries=0,  # the engine gives failed batches back with a delay instead
        before_request=lambda: wait_for_slot(budget, max_wait=max_wait),
    )
    return Poller(credential.key, upstream, budget)


class Pollers:
    """The tracker's poller and one per client token, made on first use and kept: a token's
    fingerprint names that token for good, so a kept poller never goes stale."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self._settings = settings
        self._sessions = sessions
        self.tracker = make_poller(settings, sessions, tracker_credential(settings))
        self._by_key: dict[str, Poller] = {self.tracker.credential: self.tracker}
        self._lock = threading.Lock()

    def get(self, credential: str | None) -> Poller | None:
        """The poller of this token (None: the tracker's); None when no client holds it any
        more. Raises TokenUnavailable when the token cannot be decrypted."""
        if credential is None:
            return self.tracker
        with self._lock:
            poller = self._by_key.get(credential)
        if poller is not None:
            return poller
        with self._sessions() as session:
            found = credential_by_key(session, credential, settings=self._settings)
        if found is None:
            return None
        with self._lock:
            return self._by_key.setdefault(
                credential, make_poller(self._settings, self._sessions, found)
            )


@dataclass(frozen=True)
class WorkerContext:
    """What one worker process shares between jobs: settings, sessions, the pollers (the
    tracker's token's `upstream`, `budget` and `credential`, and each client token's)."""

    settings: Settings
    sessions: sessionmaker[Session]
    upstream: UpstreamClient
    budget: Budget
    credential: str
    pollers: Pollers

    @classmethod
    def create(cls, settings: Settings, sessions: sessionmaker[Session]) -> WorkerContext:
        pollers = Pollers(settings, sessions)
        tracker = pollers.tracker
        return cls(
            settings, sessions, tracker.upstream, tracker.budget, tracker.credential, pollers
        )


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    settings = get_settings()
    # A connection per worker thread stays open: the default pool (5 kept, 10 more
    # opened and closed as needed) makes 16 threads connect again every few jobs.
    sessions = session_factory(make_engine(settings.database_url, pool_size=DEFAULT_CONCURRENCY))
    return WorkerContext.create(settings, sessions)


def poll_with_tokens(ctx: WorkerContext, batches: Sequence[PollBatch]) -> Iterator[PollOutcome]:
    """Poll a job's batches, each with its token's client and budget (`run_poll_job`)."""
    by_token: dict[str | None, list[PollBatch]] = {}
    for batch in batches:
        by_token.setdefault(batch.credential, []).append(batch)
    for credential, group in by_token.items():
        poller = _poller_for(ctx, credential, group)
        if poller is None:
            continue
        yield from run_poll_job(
            ctx.sessions,
            poller.upstream,
            poller.budget,
            group,
            settings=ctx.settings,
            credential=poller.credential,
        )


def _poller_for(
    ctx: WorkerContext, credential: str | None, batches: Sequence[PollBatch]
) -> Poller | None:
    """The poller of a job's token; None, with the batches given back, when it cannot poll:
    no client holds the token any more (due again at once, for the current token), or it
    cannot be decrypted here (recorded as rejected: /readyz names the client)."""
    now = utcnow()
    try:
        poller = ctx.pollers.get(credential)
    except TokenUnavailable as exc:
        assert credential is not None
        log.error("cannot poll %d batches with token %s: %s", len(batches), credential, exc)
        with ctx.sessions.begin() as session:
            mark_rejected(session, credential, exc.message, now=now)
            for batch in batches:
                retry_at = now + timedelta(seconds=ctx.settings.max_poll_interval)
                release_batch(session, batch, retry_at=retry_at)
        return None
    if poller is None:
        with ctx.sessions.begin() as session:
            for batch in batches:
                release_batch(session, batch, retry_at=now)
    return poller
