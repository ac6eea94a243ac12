"""`POST /v1/doorbell/{token}`: AceData's callback, taken as a doorbell and nothing more.

No API key: the upstream calls it. Nothing in the body is read, let alone trusted
(AceData's callbacks are unsigned): a known token makes its task due for a poll now
and rings a worker, and the poll's answer decides. The answer is 204 whatever the
token, so the route tells a caller nothing; a flood answers 429, known and unknown
tokens alike (`TRACKER_DOORBELL_RPS` per API process). The token is kept out of the
request log.

The route only notes the token: tokens rung within `DOORBELL_WINDOW` are made due
in one statement and rung as one `poll_now` job, so a burst of callbacks costs the
database and the broker a few writes a second, and the caller an immediate 204. A
token noted by an API process that dies before the window ends is polled on its
schedule anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from sqlalchemy.orm import Session, sessionmaker

from tracker.api.errors import ApiError
from tracker.api.resources import ErrorBody
from tracker.clock import utcnow
from tracker.db.engine import transaction
from tracker.polling.doorbell import ring_doorbells
from tracker.worker.doorbells import Doorbell

log = logging.getLogger("tracker.api")

router = APIRouter(tags=["doorbell"])

# Tokens rung within this window are made due together, and share one poll job.
DOORBELL_WINDOW = 0.05
DOORBELL_BATCH = 500


class RateLimit:
    """A token bucket: `rate` per second, bursts of `rate`; thread-safe."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._tokens = rate
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


def doorbell_gatherer(
    sessions: sessionmaker[Session], poll: Callable[[Iterable[int]], None]
) -> Doorbell:
    """Gathers rung tokens; each batch is made due in one transaction, then `poll` is rung
    with the registrations that became due."""

    def make_due(tokens: list[str]) -> None:
        try:
            with transaction(sessions) as session:
                row_ids = ring_doorbells(session, tokens, now=utcnow())
        except Exception:  # the database is away: polling covers these tasks
            log.warning(
                "could not ring %d doorbells; their tasks are polled on schedule", len(tokens)
            )
            return
        if row_ids:
            poll(row_ids)

    return Doorbell(make_due, window=DOORBELL_WINDOW, batch_size=DOORBELL_BATCH)


@router.post(
    "/v1/doorbell/{token}",
    status_code=204,
    summary="The upstream's callback: poll that task now",
    responses={
        204: {"description": "Rung (or not: an unknown token answers the same)."},
        429: {
            "model": ErrorBody,
            "description": "Too many doorbells at once; polling covers what is refused.",
        },
        # Never sent: any token, any body answers 204.
        422: {"model": ErrorBody, "description": "Not used: every token answers 204."},
    },
)
async def doorbell(
    token: Annotated[
        str,
        Path(
            description="The token of the doorbell URL; any other answers the same.",
            # Documented, not enforced: a token of any shape answers 204.
            json_schema_extra={"pattern": "^[A-Za-z0-9_-]{1,128}$"},
        ),
    ],
    request: Request,
) -> Response:
    """Make the task this token belongs to due for a poll now; the body is ignored."""
    limit: RateLimit = request.app.state.doorbell_limit
    if not limit.allow():
        raise ApiError(
            429,
            "too_many_requests",
            "too many doorbells at once; the task is polled on its schedule anyway",
            headers={"Retry-After": "1"},
        )
    gatherer: Doorbell = request.app.state.doorbells
    gatherer.ring([token])
    return Response(status_code=204)
