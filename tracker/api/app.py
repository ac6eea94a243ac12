"""The FastAPI application: routers, error handlers, the request middleware, the database."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
import sqlalchemy as sa
from fastapi import FastAPI

from tracker import __version__
from tracker.api import client, deliveries, destinations, health, tasks
from tracker.api.errors import install_error_handlers
from tracker.api.middleware import RequestContextMiddleware
from tracker.config import Settings, get_settings
from tracker.db.engine import get_engine, session_factory
from tracker.tracking.clients import KeyCache

MAX_BODY_BYTES = 1024 * 1024

log = logging.getLogger("tracker.api")

DESCRIPTION = """\
Register AceData task ids with a callback URL; the tracker polls the upstream,
records every state change and sends a signed webhook when a task completes,
fails or times out. Every `/v1` route needs `Authorization: Bearer <api key>`
(`tracker clients create` makes one). Errors answer
`{"error": {"code", "message"}, "trace_id"}`.
"""


# Few request threads hide the database's latency; more fight over the GIL with the event
# loop. Fewer than the pool keeps open (docs/decisions/0010-three-api-request-threads.md).
API_THREADS = 3


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Before the first request: fill the connection pool, set the request threads, freeze
    the start-up heap (docs/decisions/0013-keyset-paging.md)."""
    engine: sa.Engine = app.state.sessions.kw["bind"]
    # SQLite: connecting costs nothing, and each statement takes the write lock
    # (BEGIN IMMEDIATE, see tracker.db.engine), so a second held connection would wait on the first.
    pool = engine.pool
    pooled = isinstance(pool, sa.pool.QueuePool) and engine.dialect.name != "sqlite"
    size = pool.size() if isinstance(pool, sa.pool.QueuePool) and pooled else 1
    try:
        with contextlib.ExitStack() as held:
            for _ in range(size):
                held.enter_context(engine.connect()).execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:  # the API still starts; /readyz reports the database
        log.warning("database not reachable at start-up: %s", exc.__class__.__name__)
    anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
    gc.collect()
    gc.freeze()
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API on `settings.database_url` (default: the configured settings)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="tracker",
        version=__version__,
        description=DESCRIPTION,
        redirect_slashes=False,
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.sessions = session_factory(get_engine(settings.database_url))
    app.state.key_cache = KeyCache()
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=MAX_BODY_BYTES)
    app.include_router(tasks.router)
    app.include_router(deliveries.router)
    app.include_router(destinations.router)
    app.include_router(client.router)
    app.include_router(health.router)
    return app
