"""delivery operations: webhook destinations, client defaults, operational events

- `webhook_destinations`: a client's callback destination (scheme, host, port) and its
  circuit breaker;
- `webhook_deliveries.destination` names it; `task_row_id` becomes nullable, since an
  operational event (to a client's `operations_url`) belongs to no task;
- `clients` gains `default_callback_url`, `default_events` and `operations_url`;
- indexes for a destination's due and leased deliveries, and for retention
  (`tasks.finished_at`).

Existing deliveries get their destination from their callback URL, one UPDATE per
distinct URL.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

from collections.abc import Sequence
from urllib.parse import urlsplit

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIGINT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PENDING = "status = 'pending'"
LEASED = "claimed_until IS NOT NULL"
FINISHED = "finished_at IS NOT NULL"


def _destination(url: str) -> str:
    """`tracker.tracking.schemas.destination_of` as of this revision."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return url
    host = parts.hostname
    if not host or port is None:
        return url
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme.lower()}://{host.lower()}:{port}"


def upgrade() -> None:
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("default_callback_url", sa.String(2048), nullable=True))
        batch_op.add_column(sa.Column("default_events", JSON, nullable=True))
        batch_op.add_column(sa.Column("operations_url", sa.String(2048), nullable=True))

    op.create_table(
        "webhook_destinations",
        sa.Column("id", BIGINT, nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("origin", sa.String(2048), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_probe_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "state IN ('disabled', 'healthy', 'open')",
            name=op.f("ck_webhook_destinations_state"),
        ),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_webhook_destinations_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_destinations")),
        sa.UniqueConstraint(
            "client_id", "origin", name=op.f("uq_webhook_destinations_client_id_origin")
        ),
    )

    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("destination", sa.String(2048), nullable=True))
        batch_op.alter_column("task_row_id", existing_type=BIGINT, nullable=True)
    connection = op.get_bind()
    urls = connection.execute(sa.text("SELECT DISTINCT callback_url FROM webhook_deliveries"))
    for (url,) in list(urls):
        connection.execute(
            sa.text("UPDATE webhook_deliveries SET destination = :d WHERE callback_url = :u"),
            {"d": _destination(url), "u": url},
        )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.alter_column("destination", existing_type=sa.String(2048), nullable=False)
        batch_op.create_index(
            "ix_webhook_deliveries_destination_due",
            ["client_id", "destination", "next_attempt_at", "id"],
            unique=False,
            postgresql_where=sa.text(PENDING),
            sqlite_where=sa.text(PENDING),
        )
        batch_op.create_index(
            "ix_webhook_deliveries_destination_leased",
            ["client_id", "destination"],
            unique=False,
            postgresql_where=sa.text(LEASED),
            sqlite_where=sa.text(LEASED),
        )

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_tasks_finished",
            ["finished_at"],
            unique=False,
            postgresql_where=sa.text(FINISHED),
            sqlite_where=sa.text(FINISHED),
        )


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_tasks_finished",
            postgresql_where=sa.text(FINISHED),
            sqlite_where=sa.text(FINISHED),
        )
    # Operational events belong to no task: they cannot be kept under the old schema.
    op.execute("DELETE FROM webhook_deliveries WHERE task_row_id IS NULL")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_webhook_deliveries_destination_leased",
            postgresql_where=sa.text(LEASED),
            sqlite_where=sa.text(LEASED),
        )
        batch_op.drop_index(
            "ix_webhook_deliveries_destination_due",
            postgresql_where=sa.text(PENDING),
            sqlite_where=sa.text(PENDING),
        )
        batch_op.alter_column("task_row_id", existing_type=BIGINT, nullable=False)
        batch_op.drop_column("destination")
    op.drop_table("webhook_destinations")
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.drop_column("operations_url")
        batch_op.drop_column("default_events")
        batch_op.drop_column("default_callback_url")
