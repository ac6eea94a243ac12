"""Engine and session factory, and the few places SQLite and PostgreSQL differ."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tracker.config import get_settings

log = logging.getLogger("tracker.db")

T = TypeVar("T")

# Seconds between tries of a transaction while the database cannot be reached.
UNREACHABLE_PAUSE = 0.5


def normalise_url(url: str) -> str:
    """Pin PostgreSQL URLs to the psycopg 3 driver the package installs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while a worker writes; busy_timeout makes writers
    # queue for the lock instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock when the transaction starts, not at its first write,
    # so that claim-then-update transactions never deadlock on lock upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url` with this service's connection settings."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )
        # Hand transaction control to SQLAlchemy so BEGIN IMMEDIATE is ours to send.
        event.listen(engine, "connect", _disable_pysqlite_transactions)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(url, **kwargs)


def _disable_pysqlite_transactions(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None


def is_postgresql(engine_or_session: Engine | Session) -> bool:
    bind = (
        engine_or_session.get_bind()
        if isinstance(engine_or_session, Session)
        else engine_or_session
    )
    return bind.dialect.name == "postgresql"


def autocommit_engine(sessions: Engine | sessionmaker[Session]) -> Engine | None:
    """On PostgreSQL, an engine for the hot paths whose work is one statement: autocommit,
    and no ping when a connection is taken from its pool, so the statement is the one
    round trip (no BEGIN, COMMIT or `SELECT 1`). None elsewhere
    (docs/decisions/0008-record-acknowledged-answers-at-once.md).

    Its pool is its own, as large as a default engine's. Without the ping, a statement
    on a connection the server has dropped (a restart) fails with `OperationalError`
    and the pool is renewed: callers keep a way on, such as a transaction on the
    engine itself (which pings) or a retry.
    """
    engine = sessions if isinstance(sessions, Engine) else sessions.kw.get("bind")
    return _autocommit_twin(engine) if isinstance(engine, Engine) else None


@lru_cache(maxsize=8)
def _autocommit_twin(engine: Engine) -> Engine | None:
    if not is_postgresql(engine):
        return None
    url = engine.url.render_as_string(hide_password=False)
    return make_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=False)


def dialect_insert(session: Session) -> Callable[..., Any]:
    """The INSERT construct of the session's database, which knows `ON CONFLICT`."""
    return pg_insert if is_postgresql(session) else sqlite_insert


@lru_cache(maxsize=4)
def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: the configured database)."""
    return make_engine(url or get_settings().database_url)


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def transaction(
    target: Engine | sessionmaker[Session] | None = None,
) -> Iterator[Session]:
    """`with transaction() as session:` one unit of work, committed on success.

    `target` is an engine or a session factory (default: the configured database).
    Functions that take a session never commit: the caller's transaction is this one.
    """
    if isinstance(target, sessionmaker):
        with target.begin() as session:
            yield session
        return
    with Session(target or get_engine(), expire_on_commit=False) as session, session.begin():
        yield session


def retry_while_unreachable(work: Callable[[], T], *, deadline: float, what: str) -> T:
    """Run `work`, one whole transaction, again while the database cannot be reached.

    For work whose loss costs more than a wait, such as recording webhook answers
    (lost, each would be sent again once its lease expires). Gives up, raising the
    last error, at `deadline` (a `time.monotonic()` value). If a commit landed but
    its acknowledgement was lost, `work` runs twice: callers must make that harmless.
    """
    while True:
        try:
            return work()
        except OperationalError as exc:  # refused, dropped, shutting down, locked
            if time.monotonic() + UNREACHABLE_PAUSE >= deadline:
                raise
            reason = str(exc.orig or exc).splitlines()[0]
            log.warning("the database cannot be reached (%s); %s again shortly", reason, what)
            time.sleep(UNREACHABLE_PAUSE)
