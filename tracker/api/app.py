"""The FastAPI application: routers, error handlers, the request middleware, the database."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

import anyio.to_thread
import sqlalchemy as sa
from fastapi import Depends, FastAPI

from tracker import __version__
from tracker.api import (
    acedata,
    client,
    deliveries,
    destinations,
    doorbell,
    health,
    services,
    submit,
    tasks,
    ui,
)
from tracker.api.deps import known_query_parameters
from tracker.api.docs import install_docs
from tracker.api.errors import install_error_handlers
from tracker.api.middleware import RequestContextMiddleware
from tracker.config import Settings, get_settings
from tracker.db.engine import get_engine, session_factory
from tracker.tracking.clients import KeyCache
from tracker.worker.jobs import ring_poll_doorbell

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
    settings: Settings = app.state.settings
    if not settings.public_url:
        log.warning(
            "TRACKER_PUBLIC_URL is not set: submissions (POST /v1/{service}/submit) work, "
            "without the doorbell: their tasks are seen done at the next poll rather than "
            "when AceData calls back"
        )
    anyio.to_thread.current_default_thread_limiter().total_tokens = API_THREADS
    gc.collect()
    gc.freeze()
    yield
    app.state.doorbells.flush()  # tokens rung a moment ago: due before the process goes


def create_served_app() -> FastAPI:
    """The app of one serving process of `tracker api --workers N` (uvicorn's factory): the
    configured settings, with the process's logging set up as the command's own."""
    from tracker.observability.logs import configure_logging

    settings = get_settings()
    configure_logging(settings)
    return create_app(settings)


def create_app(
    settings: Settings | None = None,
    *,
    poll_doorbell: Callable[[Iterable[int]], None] | None = None,
) -> FastAPI:
    """The API on `settings.database_url` (default: the configured settings).

    `poll_doorbell` asks workers to poll registrations a doorbell made due (default: a
    `poll_now` job on the configured broker; tests pass their own).
    """
    settings = settings or get_settings()
    app = FastAPI(
        title="tracker",
        version=__version__,
        description=DESCRIPTION,
        redirect_slashes=False,
        lifespan=_lifespan,
        docs_url=None,  # served from the package by install_docs, not from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.sessions = session_factory(get_engine(settings.database_url))
    app.state.key_cache = KeyCache()
    app.state.submitters = submit.Submitters()
    app.state.facade_pollers = acedata.FacadePollers()
    app.state.doorbell_limit = doorbell.RateLimit(settings.doorbell_rps)
    app.state.doorbells = doorbell.doorbell_gatherer(
        app.state.sessions, poll_doorbell or ring_poll_doorbell
    )
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=MAX_BODY_BYTES)
    strict_query = [Depends(known_query_parameters)]
    app.include_router(tasks.router, dependencies=strict_query)
    app.include_router(deliveries.router, dependencies=strict_query)
    app.include_router(services.router, dependencies=strict_query)
    app.include_router(submit.router, dependencies=strict_query)
    app.include_router(doorbell.router)
    app.include_router(acedata.router)
    app.include_router(destinations.router, dependencies=strict_query)
    app.include_router(client.router, dependencies=strict_query)
    app.include_router(health.router)
    install_docs(app)
    ui.install(app)
    return app
