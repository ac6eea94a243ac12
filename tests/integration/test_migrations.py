"""The Alembic migrations build exactly the models, up and down, on both backends."""

from __future__ import annotations

import sqlalchemy as sa

from tracker.db import migrate
from tracker.db.engine import make_engine
from tracker.db.models import Base


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


def test_0002_moves_each_registrations_schedule_and_back(db_url: str) -> None:
    """The polling columns of existing registrations go to `task_schedule`, and return."""
    engine = make_engine(db_url)
    due = "2026-12-01 10:00:05+00:00"
    try:
        migrate.downgrade(db_url, "0001")
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO clients (id, name, api_key_hash, api_key_prefix, created_at) "
                "VALUES (1, 'c', 'h', 'p', '2026-12-01 10:00:00+00:00')"
            )
            for row_id, next_poll_at, polls, misses in [(1, due, 3, 2), (2, None, 7, 0)]:
                conn.execute(
                    sa.text(
                        "INSERT INTO tasks (id, client_id, task_id, service, state, metadata, "
                        "events, timeout_seconds, created_at, updated_at, deadline_at, polls, "
                        "next_poll_at, misses) VALUES (:id, 1, :task_id, 'luma', 'running', "
                        "'{}', '[]', 60, :t, :t, :t, :polls, :next_poll_at, :misses)"
                    ),
                    {
                        "id": row_id,
                        "task_id": f"t{row_id}",
                        "t": "2026-12-01 10:00:00+00:00",
                        "polls": polls,
                        "next_poll_at": next_poll_at,
                        "misses": misses,
                    },
                )
        migrate.upgrade(db_url)
        with engine.connect() as conn:
            moved = conn.exec_driver_sql(
                "SELECT task_row_id, next_poll_at IS NOT NULL, polls, misses "
                "FROM task_schedule ORDER BY task_row_id"
            ).all()
        assert [tuple(row) for row in moved] == [(1, True, 3, 2), (2, False, 7, 0)]
        migrate.downgrade(db_url, "0001")
        with engine.connect() as conn:
            back = conn.exec_driver_sql(
                "SELECT id, next_poll_at IS NOT NULL, polls, misses FROM tasks ORDER BY id"
            ).all()
        assert [tuple(row) for row in back] == [(1, True, 3, 2), (2, False, 7, 0)]
    finally:
        migrate.upgrade(db_url)
        engine.dispose()
