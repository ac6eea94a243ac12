"""The FastAPI application: routers, error handlers, the request middleware, the database."""

from __future__ import annotations

from fastapi import FastAPI

from tracker import __version__
from tracker.api import deliveries, health, tasks
from tracker.api.errors import install_error_handlers
from tracker.api.middleware import RequestContextMiddleware
from tracker.config import Settings, get_settings
from tracker.db import get_engine, session_factory

MAX_BODY_BYTES = 1024 * 1024

DESCRIPTION = """\
Register AceData task ids with a callback URL; the tracker polls the upstream,
records every state change and sends a signed webhook when a task completes,
fails or times out. Every `/v1` route needs `Authorization: Bearer <api key>`
(`tracker clients create` makes one). Errors answer
`{"error": {"code", "message"}, "trace_id"}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API on `settings.database_url` (default: the configured settings)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="tracker",
        version=__version__,
        description=DESCRIPTION,
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.sessions = session_factory(get_engine(settings.database_url))
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=MAX_BODY_BYTES)
    app.include_router(tasks.router)
    app.include_router(deliveries.router)
    app.include_router(health.router)
    return app
