"""Shared fixtures: real SQLite and PostgreSQL databases, Redis, settings.

Every test module that touches the database runs on both backends through the
parametrised `db_url` fixture. PostgreSQL and Redis are those at the TRACKER_TEST_*
URLs when they answer; where one does not, the session starts a private server and
says so in one line (tests/support/services.py). A service that can be neither
reached nor started fails the run with a clear message, it never skips.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from tests.support import services
from tests.support.receiver import Receiver
from tests.support.sim import SimulatorHandle
from tracker.config import Settings, load_settings
from tracker.db import migrate
from tracker.db.engine import make_engine
from tracker.db.models import Base
from tracker.devtools.simulator import serving_in_thread
from tracker.tracking.clients import NewClient, create_client

# The services' URLs, resolved once in pytest_configure: the configured ones
# (TRACKER_TEST_POSTGRES_URL, TRACKER_TEST_REDIS_URL, TRACKER_TEST_BROKER_URL) where
# they answer, else those of private servers started for the session.
PG_ADMIN_URL = services.DEFAULT_URLS[services.POSTGRES_ENV]
REDIS_URL = services.DEFAULT_URLS[services.REDIS_ENV]
BROKER_URL = services.DEFAULT_URLS[services.BROKER_ENV]
_services: services.TestServices | None = None


def pytest_configure(config: pytest.Config) -> None:
    global PG_ADMIN_URL, REDIS_URL, BROKER_URL, _services
    if config.option.help or config.option.collectonly:
        return
    try:
        _services = services.resolve()
    except services.ServiceError as exc:
        raise pytest.UsageError(str(exc)) from exc
    services.expose_tools(_services)
    PG_ADMIN_URL, REDIS_URL, BROKER_URL = (
        _services.postgres_url,
        _services.redis_url,
        _services.broker_url,
    )


def pytest_unconfigure() -> None:
    if _services is not None:
        _services.stop()


def pytest_report_header() -> str | None:
    return _services.notice if _services else None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # With -q there is no header: the notice goes at the end instead.
    if _services and _services.notice and terminalreporter.verbosity < 0:
        terminalreporter.write_line(_services.notice)


def _service_missing(what: str, url: str, exc: Exception) -> pytest.UsageError:
    return pytest.UsageError(
        f"{what} does not answer at {url} ({exc}). The tests need it: start it or point "
        f"TRACKER_TEST_{what.upper()}_URL elsewhere (where nothing listens at the URL, "
        f"the session starts a private one unless {services.MODE_ENV}=system)."
    )


@pytest.fixture(scope="session")
def postgresql_database_url() -> Iterator[str]:
    """A private, migrated PostgreSQL database for this test session."""
    admin = make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"tracker_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        raise _service_missing("postgres", PG_ADMIN_URL, exc) from exc
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "tracker.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of an empty, migrated database; the test runs once per backend."""
    url: str = request.getfixturevalue(f"{request.param}_database_url")
    engine = _engine_for(url)
    _empty(engine)
    return url


_engines: dict[str, Engine] = {}


def _engine_for(url: str) -> Engine:
    if url not in _engines:
        _engines[url] = make_engine(url)
    return _engines[url]


def _empty(engine: Engine) -> None:
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        else:
            for table in tables:
                conn.exec_driver_sql(f"DELETE FROM {table}")


@pytest.fixture
def engine(db_url: str) -> Engine:
    return _engine_for(db_url)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session; the test commits (or not) as the code under test expects."""
    with Session(engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def settings(db_url: str) -> Settings:
    """Settings on the test database; tests derive variants with `settings.model_copy`."""
    return load_settings(
        database_url=db_url,
        webhook_allow_private=True,
        upstream_token="test-token",
        _env_file=None,
    )


@pytest.fixture
def client(session: Session) -> NewClient:
    new = create_client(session, "acme")
    session.commit()
    return new


@pytest.fixture
def api(settings: Settings) -> TestClient:
    """The HTTP API on the test database, called in-process."""
    from tracker.api import create_app

    return TestClient(create_app(settings))


@pytest.fixture
def auth(client: NewClient) -> dict[str, str]:
    """The `Authorization` header of the `client` fixture's API key."""
    return {"Authorization": f"Bearer {client.api_key}"}


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of the tests' own, emptied before each test."""
    conn = redis.Redis.from_url(REDIS_URL)
    try:
        conn.flushdb()
    except redis.exceptions.ConnectionError as exc:
        raise _service_missing("redis", REDIS_URL, exc) from exc
    yield REDIS_URL
    conn.close()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish() -> None:
    for engine in _engines.values():
        engine.dispose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real webhook receiver on 127.0.0.1: `script()` its answers, read its `requests`."""
    server = Receiver()
    yield server
    server.close()


@pytest.fixture(scope="session")
def simulator_url() -> Iterator[str]:
    """The simulator, served from a background thread for the whole session; its base URL."""
    with serving_in_thread() as url:
        yield url


@pytest.fixture
def simulator(simulator_url: str) -> Iterator[SimulatorHandle]:
    """The simulator on loopback, reset for this test: knobs, seeding, stats (tests/sim.py)."""
    handle = SimulatorHandle(simulator_url)
    handle.reset()
    yield handle
    handle.close()


@pytest.fixture
def pg_url(postgresql_database_url: str) -> str:
    """The session's PostgreSQL database, emptied: for tests that only make sense there."""
    _empty(_engine_for(postgresql_database_url))
    return postgresql_database_url


@pytest.fixture
def broker() -> Iterator[str]:
    """A Redis database used as the Celery broker of end-to-end tests, emptied around each."""
    conn = redis.Redis.from_url(BROKER_URL)
    conn.flushdb()
    yield BROKER_URL
    conn.flushdb()
    conn.close()
