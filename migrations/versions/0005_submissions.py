"""submissions: clients' own upstream tokens, doorbell tokens, idempotency keys

`clients` gains the client's own AceData token (encrypted) and its fingerprint;
`tasks` the hash of the doorbell token a submission gave AceData as callback
URL; `idempotency_keys` keeps the first answer to a submission sent with an
`Idempotency-Key` header.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("upstream_token_ciphertext", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("upstream_credential", sa.String(length=64), nullable=True))
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("doorbell_hash", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_tasks_doorbell_hash", ["doorbell_hash"], unique=True)
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column(
            "answer",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_idempotency_keys_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("client_id", "key", name=op.f("uq_idempotency_keys_client_id_key")),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_doorbell_hash")
        batch_op.drop_column("doorbell_hash")
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.drop_column("upstream_credential")
        batch_op.drop_column("upstream_token_ciphertext")
