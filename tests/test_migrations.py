"""The Alembic migrations build exactly the models, up and down, on both backends."""

from __future__ import annotations

import sqlalchemy as sa

from tracker import migrate
from tracker.db import make_engine
from tracker.models import Base


def test_upgrade_has_no_drift_from_models(db_url: str) -> None:
    migrate.check(db_url)  # raises if autogenerate would emit any operation


def test_downgrade_then_upgrade_round_trips(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate.downgrade(db_url, "base")
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(db_url)
        tables = set(sa.inspect(engine).get_table_names())
        assert {table.name for table in Base.metadata.sorted_tables} <= tables
    finally:
        migrate.upgrade(db_url)
        engine.dispose()
