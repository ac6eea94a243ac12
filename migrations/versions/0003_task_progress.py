"""tasks.progress: how far the upstream says a task is, 0-100, where the service reports it

Progress changes while the state does not (Midjourney's 0-100, Suno's per-song
progress, Maestro's percent). A poll writes only what changes, judged against what
the claim read of the registration; the claim reads this column, so a new progress
is written and an unchanged one costs nothing.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("progress", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("progress")
