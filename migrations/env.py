"""Alembic environment: the URL comes from Settings (or `-x url=...`), batch mode for SQLite."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from tracker.config import get_settings
from tracker.db.engine import make_engine
from tracker.db.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or get_settings().database_url
    )


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Batch mode copies a table and drops the original: with foreign keys on, the
            # drop would delete every row referring to it (ON DELETE CASCADE).
            _foreign_keys(connection, "OFF")
        try:
            _run(connection)
        finally:
            if sqlite:
                _foreign_keys(connection, "ON")
    engine.dispose()


def _foreign_keys(connection: Connection, switch: str) -> None:
    """SQLite's foreign key checks on or off: on the driver's connection, as no transaction
    may be open (in one, the pragma does nothing, and SQLAlchemy would begin one)."""
    cursor = connection.connection.cursor()
    cursor.execute(f"PRAGMA foreign_keys={switch}")
    cursor.close()


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
