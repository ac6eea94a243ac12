"""The dashboard: `/ui`, server-rendered pages for a client's people.

Sign-in with the client's API key, a session held in the database and an `HttpOnly`,
`SameSite=Strict` cookie (`auth`, `sessions`); pages rendered from Jinja2 templates with
autoescaping and a strict Content-Security-Policy (`render`); the overview, tasks,
deliveries and destinations (`overview`, `tasks`, `deliveries`), reading what the API
reads and changing things through the same functions as the API's routes. Templates,
the stylesheet and the one script ship in the package: no build, no CDN.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from tracker.api.ui import auth, deliveries, overview, tasks
from tracker.api.ui.operations import DestinationOperations
from tracker.api.ui.render import page
from tracker.errors import CsrfRefused, SignInRequired

STATIC = Path(__file__).parent / "static"


async def _sign_in_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    return auth.sign_in_required_response(request, exc)


async def _csrf_refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CsrfRefused)
    values = {"title": "Refused", "client": None, "nav": "", "message": exc.message}
    return page("refused.html", values, status_code=403)


def install(app: FastAPI, *, operations: DestinationOperations | None = None) -> None:
    """Serve the dashboard from `app`; `operations`: the delivery engine's destinations."""
    app.state.destination_operations = operations
    app.add_exception_handler(SignInRequired, _sign_in_required)
    app.add_exception_handler(CsrfRefused, _csrf_refused)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    app.include_router(auth.router)
    app.include_router(overview.router)
    app.include_router(tasks.router)
    app.include_router(deliveries.router)


__all__ = ["DestinationOperations", "install"]
