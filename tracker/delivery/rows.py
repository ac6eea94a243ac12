"""A delivery's row as recording an attempt reads and writes it, and the attempt log.

`record_attempts` and `settle_acknowledged` (`tracker.delivery.outcome`) read a batch's
rows as `DeliveryRow`s, apply the outcome rules, and write them back here in few
statements: the attempts as one insert, the rows as one update per set of equal values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, text, update
from sqlalchemy.orm import Session

from tracker.db.engine import is_postgresql
from tracker.db.models import WebhookAttempt, WebhookDelivery
from tracker.delivery.outbox import among_ids


@dataclass
class DeliveryRow:
    """The columns of a delivery that recording an attempt reads and writes."""

    id: str
    task_row_id: int | None
    created_at: datetime
    client_id: int
    event: str
    destination: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    claimed_until: datetime | None
    updated_at: datetime
    delivered_at: datetime | None
    last_status_code: int | None
    failure_code: str | None
    failure_message: str | None


ROW_COLUMNS = tuple(getattr(WebhookDelivery, name) for name in DeliveryRow.__dataclass_fields__)
_WRITTEN = tuple(
    name
    for name in DeliveryRow.__dataclass_fields__
    if name not in ("task_row_id", "created_at", "client_id", "event", "destination")
)
_SHARED = tuple(name for name in _WRITTEN if name not in ("id", "attempts"))


ATTEMPT_COLUMNS = (
    "delivery_id",
    "attempt",
    "started_at",
    "duration_ms",
    "status_code",
    "response_excerpt",
    "error",
)
# PostgreSQL: the batch's attempts as one array per column, so the statement is the same
# (compiled and converted once) whatever the batch size.
_INSERT_ATTEMPTS_PG = text(
    f"INSERT INTO {WebhookAttempt.__tablename__} ({', '.join(ATTEMPT_COLUMNS)}) "
    "SELECT * FROM unnest(CAST(:delivery_id AS varchar[]), CAST(:attempt AS integer[]), "
    "CAST(:started_at AS timestamptz[]), CAST(:duration_ms AS integer[]), "
    "CAST(:status_code AS integer[]), CAST(:response_excerpt AS text[]), "
    "CAST(:error AS text[]))"
)


def insert_attempts(session: Session, attempt_rows: list[dict[str, Any]]) -> None:
    if is_postgresql(session):
        session.execute(
            _INSERT_ATTEMPTS_PG,
            {name: [row[name] for row in attempt_rows] for name in ATTEMPT_COLUMNS},
        )
    else:
        session.execute(insert(WebhookAttempt), attempt_rows)


def write_rows(session: Session, deliveries: Sequence[DeliveryRow]) -> None:
    """Write the rows back: one UPDATE per set of equal values (a batch that succeeded is
    one statement), the rest (retries, each with its own jittered time) in one executemany."""
    groups: dict[tuple[object, ...], list[DeliveryRow]] = {}
    for delivery in deliveries:
        groups.setdefault(tuple(getattr(delivery, name) for name in _SHARED), []).append(delivery)
    singles = []
    for values, group in groups.items():
        if len(group) == 1:
            singles.append({name: getattr(group[0], name) for name in _WRITTEN})
            continue
        # Each row's attempts were read under the lock and raised by one: the same as +1.
        session.execute(
            update(WebhookDelivery)
            .where(among_ids([delivery.id for delivery in group], session))
            .values(
                {
                    **dict(zip(_SHARED, values, strict=True)),
                    "attempts": WebhookDelivery.attempts + 1,
                }
            )
            .execution_options(synchronize_session=False)
        )
    if singles:
        session.execute(update(WebhookDelivery), singles)
