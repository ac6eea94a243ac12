"""The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright, against the real API served by uvicorn on loopback, PostgreSQL and the
simulator.

One browser for the session and one API server for the module; each test gets a fresh
browser context (no cookies) and its own clients. Screenshots go to
`TRACKER_TEST_ARTIFACTS` (default `tests/artifacts/`, git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Route, sync_playwright
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import _empty, _engine_for
from tracker.api import create_app
from tracker.config import Settings, load_settings
from tracker.db.engine import session_factory

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("TRACKER_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    configured = os.environ.get("TRACKER_TEST_CHROMIUM")
    if configured:
        return configured
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise pytest.UsageError(
        "the browser tests need Chromium: `apt-get install chromium` (bash .ci/run does), "
        "or point TRACKER_TEST_CHROMIUM at a Chromium binary"
    )


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    # No sandbox: CI runs as root, where Chromium refuses its sandbox.
    browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
    yield browser
    browser.close()


@dataclass
class Dashboard:
    """The API serving the dashboard on loopback, and its database."""

    url: str
    app: FastAPI
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def dashboard(postgresql_database_url: str) -> Iterator[Dashboard]:
    """`tracker api` on loopback in a thread, on the session's PostgreSQL database."""
    engine = _engine_for(postgresql_database_url)
    _empty(engine)
    settings = load_settings(
        database_url=postgresql_database_url,
        upstream_token="test-token",
        webhook_allow_private=True,
        webhook_retry_schedule="0",
        _env_file=None,
    )
    port = _free_port()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API did not start on loopback")
        time.sleep(0.05)
    yield Dashboard(f"http://127.0.0.1:{port}", app, settings, engine, session_factory(engine))
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(8000)
    # Nothing leaves this machine: a request to another host (an output's preview on the
    # upstream's file host) is answered here, as a failure, and the page carries on.
    context.route(re.compile(r"^(?!http://(127\.0\.0\.1|localhost)[:/]).*"), _refuse)
    yield context
    context.close()


def _refuse(route: Route) -> None:
    route.abort("blockedbyclient")


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def screenshot(page: Page, name: str) -> Path:
    """Save the whole page as `<artifacts>/<name>.png`; its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
