"""The history database: clients, tracked tasks, their transitions, webhook deliveries,
and the dashboard's sign-ins.

These tables are an interface too (users query them with SQL), so names are
stable and change only through Alembic migrations. Every column: docs/database.md.

Over ~400 lines for a reason: the tables are one interface, documented together in
docs/database.md, and kept in one module so that they read (and change) as one.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    join,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from tracker.states import ACTIVE_STATES, DELIVERY_STATUSES, DESTINATION_STATES, TASK_STATES

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored in UTC and always read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime given to the database (got {value!r})")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


JSONValue = JSON().with_variant(JSONB(), "postgresql")
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


def _in(values: frozenset[str] | tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in sorted(values))


ACTIVE_STATES_SQL = f"state IN ({_in(ACTIVE_STATES)})"


class Client(Base):
    """An application that registers tasks and receives webhooks."""

    __tablename__ = "clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    # The client's own AceData token, encrypted with TRACKER_SECRET_KEY (Fernet), and its
    # fingerprint (`upstream_credentials.key`); both null: the tracker's token is used.
    upstream_token_ciphertext: Mapped[str | None] = mapped_column(Text)
    upstream_credential: Mapped[str | None] = mapped_column(String(64))
    # Taken by registrations that omit `callback_url` / `events`.
    default_callback_url: Mapped[str | None] = mapped_column(String(2048))
    default_events: Mapped[list[str] | None] = mapped_column(JSONValue)
    # Where operational events (a failing delivery, an opened destination, ...) go.
    operations_url: Mapped[str | None] = mapped_column(String(2048))

    secrets: Mapped[list[WebhookSecret]] = relationship(
        back_populates="client", order_by="WebhookSecret.id", cascade="all, delete-orphan"
    )


class WebhookSecret(Base):
    """A signing secret of a client; an old one keeps signing until `expires_at`."""

    __tablename__ = "webhook_secrets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"), index=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]

    client: Mapped[Client] = relationship(back_populates="secrets")


tasks_table = Table(
    "tasks",
    Base.metadata,
    Column("id", BigIntPK, primary_key=True),
    Column("client_id", ForeignKey("clients.id", ondelete="CASCADE"), nullable=False),
    Column("task_id", String(128), nullable=False),
    Column("service", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("upstream_state", String(64)),
    Column("callback_url", String(2048)),
    Column("metadata", JSONValue, nullable=False),
    Column("events", JSONValue, nullable=False),
    Column("timeout_seconds", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime()),
    Column("deadline_at", UTCDateTime(), nullable=False),
    Column("failure_code", String(64)),
    Column("failure_message", Text),
    Column("record", JSONValue),
    Column("progress", SmallInteger),
    # SHA-256 of the doorbell token a submission gave AceData as its callback_url.
    Column("doorbell_hash", String(64)),
    UniqueConstraint("service", "task_id", "client_id"),
    Index("ix_tasks_doorbell_hash", "doorbell_hash", unique=True),
    CheckConstraint(f"state IN ({_in(TASK_STATES)})", name="state"),
    Index(
        "ix_tasks_deadline",
        "deadline_at",
        postgresql_where=text(ACTIVE_STATES_SQL),
        sqlite_where=text(ACTIVE_STATES_SQL),
    ),
    # Keyset listing per client, newest first, with and without filters.
    Index("ix_tasks_client_created", "client_id", "created_at", "id"),
    Index("ix_tasks_client_state_created", "client_id", "state", "created_at", "id"),
    Index("ix_tasks_client_service_created", "client_id", "service", "created_at", "id"),
    # A client's deliveries by task id, whatever the service.
    Index("ix_tasks_client_task_id", "client_id", "task_id"),
    # Retention: the terminal tasks finished before a cut-off.
    Index(
        "ix_tasks_finished",
        "finished_at",
        postgresql_where=text("finished_at IS NOT NULL"),
        sqlite_where=text("finished_at IS NOT NULL"),
    ),
)

# A registration's polling, apart from `tasks`: a claim rewrites it on every poll
# (docs/decisions/0002-task-schedule-table.md). One row per registration, kept once it is
# terminal (`next_poll_at` null) for its poll count.
task_schedule_table = Table(
    "task_schedule",
    Base.metadata,
    Column("task_row_id", ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
    Column("next_poll_at", UTCDateTime()),
    Column("claimed_until", UTCDateTime()),
    Column("polls", Integer, nullable=False, default=0),
    Column("misses", Integer, nullable=False, default=0),
    # Due polls: only active tasks have a next_poll_at.
    Index(
        "ix_task_schedule_due",
        "next_poll_at",
        postgresql_where=text("next_poll_at IS NOT NULL"),
        sqlite_where=text("next_poll_at IS NOT NULL"),
    ),
)


class Task(Base):
    """One registration: a client watching one upstream task of one service.

    Mapped to `tasks` joined with its `task_schedule` row: the ORM reads both as one
    object and writes each table only when one of its columns changed.
    """

    __table__ = join(tasks_table, task_schedule_table)

    id: Mapped[int] = column_property(tasks_table.c.id, task_schedule_table.c.task_row_id)
    client_id: Mapped[int]
    task_id: Mapped[str]
    service: Mapped[str]
    state: Mapped[str]
    upstream_state: Mapped[str | None]
    callback_url: Mapped[str | None]
    metadata_: Mapped[dict[str, Any]] = column_property(tasks_table.c.metadata)
    events: Mapped[list[str]]
    timeout_seconds: Mapped[int]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime]
    failure_code: Mapped[str | None]
    failure_message: Mapped[str | None]
    record: Mapped[dict[str, Any] | None]
    progress: Mapped[int | None]
    doorbell_hash: Mapped[str | None]
    # Poll scheduling (`task_schedule`): next_poll_at is NULL once terminal.
    polls: Mapped[int]
    next_poll_at: Mapped[datetime | None]
    claimed_until: Mapped[datetime | None]
    misses: Mapped[int]

    client: Mapped[Client] = relationship()
    transitions: Mapped[list[TaskTransition]] = relationship(
        back_populates="task", order_by="TaskTransition.id", cascade="all, delete-orphan"
    )
    deliveries: Mapped[list[WebhookDelivery]] = relationship(
        back_populates="task", order_by="WebhookDelivery.created_at", cascade="all, delete-orphan"
    )

    @property
    def failure(self) -> dict[str, str] | None:
        if self.failure_code is None:
            return None
        return {"code": self.failure_code, "message": self.failure_message or ""}


class TaskTransition(Base):
    """One change of a task's state, as observed; oldest first by `id`."""

    __tablename__ = "task_transitions"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    task_row_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    upstream_state: Mapped[str | None] = mapped_column(String(64))
    observed_at: Mapped[datetime] = mapped_column(index=True)
    record: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)

    task: Mapped[Task] = relationship(back_populates="transitions")


class WebhookDelivery(Base):
    """The outbox: one webhook event, attempted until it settles.

    A task event (`task.*`) belongs to a registration; an operational event
    (`delivery.*`, `destination.*`, to the client's `operations_url`) has no task.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(f"status IN ({_in(DELIVERY_STATUSES)})", name="status"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        Index("ix_webhook_deliveries_client_created", "client_id", "created_at", "id"),
        Index(
            "ix_webhook_deliveries_client_status_created",
            "client_id",
            "status",
            "created_at",
            "id",
        ),
        # A destination's due deliveries, oldest due first (the claim's order, so that a
        # claim of its next few reads those few, not all it holds): what comes next.
        Index(
            "ix_webhook_deliveries_destination_due",
            "client_id",
            "destination",
            "next_attempt_at",
            "id",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
        # A destination's attempts in flight: the rows leased (few at any time).
        Index(
            "ix_webhook_deliveries_destination_leased",
            "client_id",
            "destination",
            postgresql_where=text("claimed_until IS NOT NULL"),
            sqlite_where=text("claimed_until IS NOT NULL"),
        ),
    )

    # The `webhook-id` header: the same on every attempt of this event.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    # Null for an operational event.
    task_row_id: Mapped[int | None] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), index=True
    )
    event: Mapped[str] = mapped_column(String(32))
    callback_url: Mapped[str] = mapped_column(String(2048))
    # The callback URL's `scheme://host:port`: with `client_id`, its `webhook_destinations` row.
    destination: Mapped[str] = mapped_column(String(2048))
    # The exact body sent on every attempt (UTF-8 JSON), fixed when the event happened.
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    claimed_until: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    failure_code: Mapped[str | None] = mapped_column(String(64))
    failure_message: Mapped[str | None] = mapped_column(Text)

    task: Mapped[Task | None] = relationship(back_populates="deliveries")
    attempt_log: Mapped[list[WebhookAttempt]] = relationship(
        back_populates="delivery", order_by="WebhookAttempt.attempt", cascade="all, delete-orphan"
    )

    @property
    def failure(self) -> dict[str, str] | None:
        if self.failure_code is None:
            return None
        return {"code": self.failure_code, "message": self.failure_message or ""}


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery, successful or not."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)

    delivery: Mapped[WebhookDelivery] = relationship(back_populates="attempt_log")


class WebhookDestination(Base):
    """Where a client's webhooks go (scheme, host, port), and its circuit breaker.

    `healthy`: attempts flow, at most TRACKER_DESTINATION_CONCURRENCY at once. `open`:
    after TRACKER_DESTINATION_FAILURES consecutive failed attempts its deliveries are held,
    one probe attempt every TRACKER_DESTINATION_PROBE s. `disabled`: it failed without a
    success for TRACKER_DESTINATION_DISABLE_AFTER s, and its deliveries end failed.
    """

    __tablename__ = "webhook_destinations"
    __table_args__ = (
        UniqueConstraint("client_id", "origin"),
        CheckConstraint(f"state IN ({_in(DESTINATION_STATES)})", name="state"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    # `scheme://host:port`, as in `webhook_deliveries.destination`.
    origin: Mapped[str] = mapped_column(String(2048))
    state: Mapped[str] = mapped_column(String(16))
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    # The first failure since the last success (null while the last attempt succeeded).
    failing_since: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    opened_at: Mapped[datetime | None]
    # While open: when the next probe attempt may go.
    next_probe_at: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class UpstreamCredential(Base):
    """Per upstream token: the shared request budget, 429 pauses and rejections."""

    __tablename__ = "upstream_credentials"

    # A fingerprint of the token, never the token itself.
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The request budget as a schedule: the earliest moment of the next request
    # (GCRA). Used when the broker is not Redis; with Redis the schedule lives there.
    next_request_at: Mapped[datetime]
    paused_until: Mapped[datetime | None]
    rejected_at: Mapped[datetime | None]
    rejected_reason: Mapped[str | None] = mapped_column(Text)


DASHBOARD_SESSION = "session"
DASHBOARD_SIGN_IN_LINK = "sign_in_link"
DASHBOARD_SESSION_KINDS = (DASHBOARD_SESSION, DASHBOARD_SIGN_IN_LINK)


class DashboardSession(Base):
    """A dashboard sign-in, or a one-time link that makes one; found by its token's hash.

    Kept in the database, not in one API process, so that every API process knows every
    session; the token itself (the browser's cookie, the link) is never stored.
    """

    __tablename__ = "dashboard_sessions"
    __table_args__ = (CheckConstraint(f"kind IN ({_in(DASHBOARD_SESSION_KINDS)})", name="kind"),)

    # SHA-256 (hex) of the token the browser holds or the link carries.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"), index=True)
    # The client's API key hash when it signed in: a key that changes ends its sessions.
    api_key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime] = mapped_column(index=True)


class IdempotencyKey(Base):
    """A submission sent with an `Idempotency-Key` header, and the answer it got: a retry
    with the same key is answered this, and nothing is sent to the upstream again."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("client_id", "key"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True)
    client_id: Mapped[int] = mapped_column(ForeignKey("clients.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    # SHA-256 of the submission (route and body): the same key with another body is refused.
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    # Null while the submission is in flight.
    status_code: Mapped[int | None] = mapped_column(Integer)
    answer: Mapped[dict[str, Any] | None] = mapped_column(JSONValue)
    completed_at: Mapped[datetime | None]
