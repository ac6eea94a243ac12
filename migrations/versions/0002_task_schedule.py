"""task_schedule: a registration's polling columns move out of tasks

Every poll's claim rewrote `tasks.next_poll_at`, `claimed_until` and `polls`. As
`next_poll_at` is indexed, PostgreSQL could never update the row in place: each
claim wrote a new version of the wide row and an entry in all eight of its
indexes. The narrow `task_schedule` row (one per registration) takes a claim for
a third of that.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE = "next_poll_at IS NOT NULL"


def upgrade() -> None:
    op.create_table(
        "task_schedule",
        sa.Column("task_row_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite")),
        sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("polls", sa.Integer(), nullable=False),
        sa.Column("misses", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["task_row_id"],
            ["tasks.id"],
            name=op.f("fk_task_schedule_task_row_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_row_id", name=op.f("pk_task_schedule")),
    )
    op.execute(
        "INSERT INTO task_schedule (task_row_id, next_poll_at, claimed_until, polls, misses) "
        "SELECT id, next_poll_at, claimed_until, polls, misses FROM tasks"
    )
    with op.batch_alter_table("task_schedule", schema=None) as batch_op:
        batch_op.create_index(
            "ix_task_schedule_due",
            ["next_poll_at"],
            unique=False,
            postgresql_where=sa.text(DUE),
            sqlite_where=sa.text(DUE),
        )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_tasks_due", postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE)
        )
        batch_op.drop_column("polls")
        batch_op.drop_column("next_poll_at")
        batch_op.drop_column("claimed_until")
        batch_op.drop_column("misses")


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("polls", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("misses", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE tasks SET "
        + ", ".join(
            f"{column} = (SELECT s.{column} FROM task_schedule s WHERE s.task_row_id = tasks.id)"
            for column in ("polls", "next_poll_at", "claimed_until", "misses")
        )
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.alter_column("polls", server_default=None)
        batch_op.alter_column("misses", server_default=None)
        batch_op.create_index(
            "ix_tasks_due",
            ["next_poll_at"],
            unique=False,
            postgresql_where=sa.text(DUE),
            sqlite_where=sa.text(DUE),
        )
    with op.batch_alter_table("task_schedule", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_task_schedule_due", postgresql_where=sa.text(DUE), sqlite_where=sa.text(DUE)
        )
    op.drop_table("task_schedule")
