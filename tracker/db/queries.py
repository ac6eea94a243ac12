"""The read side of the history database, shared by the HTTP API and the CLI.

Listings are newest first and paged by keyset on `(created_at, id)`: a page is
one index range scan (`ix_tasks_client_*`, `ix_webhook_deliveries_client_*`),
however deep the page, never an OFFSET (docs/decisions/0013-keyset-paging.md). The
cursor is opaque to clients: the listing's letter, the last row's creation time in
microseconds since 1970 and its id, `~`-separated. Its form is a pattern
(`TASKS_CURSOR_PATTERN`, `DELIVERIES_CURSOR_PATTERN`) that the API states in its OpenAPI
document: every string of that form is a valid position, so a client or fuzzer that keeps
to the document is never refused, and any other string is.

`client_id=None` reads across every client (the CLI); the API always passes the
calling client, so nobody sees another client's rows. The serialisers turn rows
into the resource dicts of docs/api.md, the same for API and CLI `--json`.

Over ~400 lines for a reason: it is the one read side shared by the API, the CLI and
the dashboard, kept together so that all three list, page and serialise rows alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, func, select, tuple_
from sqlalchemy.orm import Session, joinedload, selectinload

from tracker.clock import isoformat_z
from tracker.db.models import (
    Task,
    TaskTransition,
    WebhookAttempt,
    WebhookDelivery,
    WebhookDestination,
)
from tracker.errors import DeliveryNotFound, InvalidCursor, InvalidQuery, TaskNotFound
from tracker.observability.metrics import DatabaseLevels
from tracker.profiles import outputs_of, profile_name
from tracker.states import COMPLETED, DELIVERY_PENDING, DESTINATION_HEALTHY

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
TASKS_LISTING = "tasks"
DELIVERIES_LISTING = "deliveries"
# Up to 16 digits of microseconds (until the year 2286) and, for tasks, 18 digits of row
# id (below PostgreSQL's BIGINT limit): every string of the form is a valid position.
TASKS_CURSOR_PATTERN = r"^t~[0-9]{1,16}~[0-9]{1,18}$"
DELIVERIES_CURSOR_PATTERN = r"^d~[0-9]{1,16}~[A-Za-z0-9._:-]{1,64}$"
_CURSORS = {
    TASKS_LISTING: ("t", re.compile(TASKS_CURSOR_PATTERN)),
    DELIVERIES_LISTING: ("d", re.compile(DELIVERIES_CURSOR_PATTERN)),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

RowT = TypeVar("RowT", Task, WebhookDelivery)


@dataclass(frozen=True)
class Page(Generic[RowT]):
    """One page of a listing; `next_cursor` is None on the last page."""

    items: list[RowT]
    next_cursor: str | None


@dataclass(frozen=True)
class Position:
    """Where a page ends: the sort key of its last row."""

    created_at: datetime
    row_id: int | str


def encode_cursor(listing: str, position: Position) -> str:
    """The opaque cursor that continues `listing` after `position`."""
    letter, _ = _CURSORS[listing]
    moment = position.created_at
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    micros = (moment - _EPOCH) // _MICROSECOND
    return f"{letter}~{micros}~{position.row_id}"


def decode_cursor(listing: str, cursor: str) -> Position:
    """The position a cursor of `listing` names; InvalidCursor if it is not one of ours."""
    _, pattern = _CURSORS[listing]
    if not pattern.fullmatch(cursor):
        raise InvalidCursor(
            "cursor: is not a cursor of this listing; pass the `next_cursor` of the previous "
            f"page unchanged, or leave it out for the first page (got {cursor[:80]!r})"
        )
    _, micros, row_id = cursor.split("~", 2)
    created_at = _EPOCH + int(micros) * _MICROSECOND
    return Position(created_at, int(row_id) if listing == TASKS_LISTING else row_id)


def as_utc(moment: datetime, *, name: str) -> datetime:
    """`moment` as an aware UTC datetime; a time without zone is taken as UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # within a day of year 1 or 9999: as early or late as can be
        return (datetime.min if moment.year == 1 else datetime.max).replace(tzinfo=UTC)


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidQuery(f"limit: must be between 1 and {MAX_PAGE_SIZE} (got {limit})")
    return limit


def _page(
    session: Session,
    query: Select[RowT],
    model: type[Task] | type[WebhookDelivery],
    *,
    listing: str,
    limit: int,
    cursor: str | None,
) -> Page[RowT]:
    """Apply the keyset (after `cursor`), the newest-first order and the limit to `query`."""
    limit = _check_limit(limit)
    if cursor is not None:
        after = decode_cursor(listing, cursor)
        query = query.where(tuple_(model.created_at, model.id) < (after.created_at, after.row_id))
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query).unique())
    if len(rows) <= limit:
        return Page(rows, None)
    last = rows[limit - 1]
    return Page(rows[:limit], encode_cursor(listing, Position(last.created_at, last.id)))


def list_tasks(
    session: Session,
    *,
    client_id: int | None,
    state: str | None = None,
    service: str | None = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    limit: int = DEFAULT_PAGE_SIZE,
    cursor: str | None = None,
) -> Page[Task]:
    """One page of tasks, newest first; `created_after`/`created_before` are exclusive bounds."""
    query = select(Task)
    if client_id is not None:
        query = query.where(Task.client_id == client_id)
    if state is not None:
        query = query.where(Task.state == state)
    if service is not None:
        query = query.where(Task.service == service)
    if created_after is not None:
        query = query.where(Task.created_at > as_utc(created_after, name="created_after"))
    if created_before is not None:
        query = query.where(Task.created_at < as_utc(created_before, name="created_before"))
    return _page(session, query, Task, listing=TASKS_LISTING, limit=limit, cursor=cursor)


def find_tasks(
    session: Session, task_id: str, *, service: str, client_id: int | None
) -> list[Task]:
    """Registrations of one upstream task with transitions and deliveries loaded, oldest first.

    At most one per client; with `client_id=None`, those of every client.
    """
    query = (
        select(Task)
        .where(Task.task_id == task_id, Task.service == service)
        .options(selectinload(Task.transitions), selectinload(Task.deliveries))
        .order_by(Task.id)
    )
    if client_id is not None:
        query = query.where(Task.client_id == client_id)
    return list(session.scalars(query))


def get_task(session: Session, task_id: str, *, service: str, client_id: int) -> Task:
    """The client's registration of one upstream task; TaskNotFound if it has none."""
    found = find_tasks(session, task_id, service=service, client_id=client_id)
    if not found:
        raise TaskNotFound(
            f"no task {task_id!r} of service {service!r} is tracked for this client; "
            "check the id and the `service` parameter"
        )
    return found[0]


def list_deliveries(
    session: Session,
    *,
    client_id: int | None,
    status: str | None = None,
    task_id: str | None = None,
    limit: int = DEFAULT_PAGE_SIZE,
    cursor: str | None = None,
) -> Page[WebhookDelivery]:
    """One page of webhook deliveries, newest first; `task_id` is the upstream task id."""
    query = select(WebhookDelivery).options(joinedload(WebhookDelivery.task))
    if client_id is not None:
        query = query.where(WebhookDelivery.client_id == client_id)
    if status is not None:
        query = query.where(WebhookDelivery.status == status)
    if task_id is not None:
        registrations = select(Task.id).where(Task.task_id == task_id)
        if client_id is not None:
            registrations = registrations.where(Task.client_id == client_id)
        query = query.where(WebhookDelivery.task_row_id.in_(registrations))
    return _page(
        session, query, WebhookDelivery, listing=DELIVERIES_LISTING, limit=limit, cursor=cursor
    )


def get_delivery(session: Session, delivery_id: str, *, client_id: int | None) -> WebhookDelivery:
    """One delivery with its task and every attempt; DeliveryNotFound if the client has none."""
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .options(joinedload(WebhookDelivery.task), selectinload(WebhookDelivery.attempt_log))
    )
    if client_id is not None:
        query = query.where(WebhookDelivery.client_id == client_id)
    delivery = session.scalar(query)
    if delivery is None:
        raise DeliveryNotFound(
            f"no webhook delivery {delivery_id!r} for this client; ids are the `webhook-id` "
            "header, listed by GET /v1/deliveries"
        )
    return delivery


# Serialisers: rows to the resources of docs/api.md.


def task_outputs(task: Task) -> list[dict[str, Any]]:
    """A task's artifacts in one shape for every service, read from its last record by the
    service's profile: `[]` until it completed."""
    return outputs_of(task.service, task.record) if task.state == COMPLETED else []


def task_resource(task: Task) -> dict[str, Any]:
    """A task as the API shows it."""
    return {
        "task_id": task.task_id,
        "service": task.service,
        "state": task.state,
        "upstream_state": task.upstream_state,
        "callback_url": task.callback_url,
        "metadata": task.metadata_,
        "events": list(task.events),
        "created_at": isoformat_z(task.created_at),
        "updated_at": isoformat_z(task.updated_at),
        "finished_at": isoformat_z(task.finished_at),
        "deadline_at": isoformat_z(task.deadline_at),
        "polls": task.polls,
        "failure": task.failure,
        "progress": task.progress,
        "outputs": task_outputs(task),
        "profile": profile_name(task.service),
        "record": task.record,
    }


def transition_resource(transition: TaskTransition) -> dict[str, Any]:
    return {
        "from_state": transition.from_state,
        "to_state": transition.to_state,
        "upstream_state": transition.upstream_state,
        "observed_at": isoformat_z(transition.observed_at),
    }


def delivery_summary(delivery: WebhookDelivery) -> dict[str, Any]:
    """A delivery as listed in a task resource; `attempts` is the number made so far."""
    return {
        "id": delivery.id,
        "event": delivery.event,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": isoformat_z(delivery.next_attempt_at),
        "delivered_at": isoformat_z(delivery.delivered_at),
        "last_status_code": delivery.last_status_code,
        "failure": delivery.failure,
    }


def task_detail(task: Task) -> dict[str, Any]:
    """A task with its transitions (oldest first) and its deliveries."""
    return {
        **task_resource(task),
        "transitions": [transition_resource(t) for t in task.transitions],
        "deliveries": [delivery_summary(d) for d in task.deliveries],
    }


def delivery_resource(delivery: WebhookDelivery) -> dict[str, Any]:
    """A delivery as `GET /v1/deliveries` lists it: the summary, its task and its times."""
    return {
        **delivery_summary(delivery),
        # An operational event (to the client's operations URL) belongs to no task.
        "task_id": delivery.task.task_id if delivery.task else None,
        "service": delivery.task.service if delivery.task else None,
        "callback_url": delivery.callback_url,
        "created_at": isoformat_z(delivery.created_at),
        "updated_at": isoformat_z(delivery.updated_at),
    }


def attempt_resource(attempt: WebhookAttempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "started_at": isoformat_z(attempt.started_at),
        "duration_ms": attempt.duration_ms,
        "status_code": attempt.status_code,
        "response_excerpt": attempt.response_excerpt,
        "error": attempt.error,
    }


def delivery_detail(delivery: WebhookDelivery) -> dict[str, Any]:
    """A delivery with its payload and every attempt.

    Here `attempts` is the list of attempts (docs/api.md) and their number,
    which the summary calls `attempts`, moves to `attempt_count`.
    """
    resource = delivery_resource(delivery)
    resource["attempt_count"] = resource.pop("attempts")
    resource["payload"] = json.loads(delivery.payload)
    resource["attempts"] = [attempt_resource(a) for a in delivery.attempt_log]
    return resource


def attempts_by_delivery(
    session: Session, delivery_ids: list[str]
) -> dict[str, list[dict[str, Any]]]:
    """Every attempt of these deliveries, first first, by delivery id, in one query."""
    if not delivery_ids:
        return {}
    rows = session.scalars(
        select(WebhookAttempt)
        .where(WebhookAttempt.delivery_id.in_(delivery_ids))
        .order_by(WebhookAttempt.delivery_id, WebhookAttempt.attempt)
    )
    attempts: dict[str, list[dict[str, Any]]] = {}
    for attempt in rows:
        attempts.setdefault(attempt.delivery_id, []).append(attempt_resource(attempt))
    return attempts


def task_counts(session: Session, *, client_id: int) -> dict[str, dict[str, int]]:
    """A client's tasks counted by service, then state (one index scan of its tasks)."""
    rows = session.execute(
        select(Task.service, Task.state, func.count())
        .where(Task.client_id == client_id)
        .group_by(Task.service, Task.state)
    )
    counts: dict[str, dict[str, int]] = {}
    for service, state, count in rows:
        counts.setdefault(service, {})[state] = count
    return counts


def delivery_counts(session: Session, *, client_id: int) -> dict[str, int]:
    """A client's webhook deliveries counted by status."""
    rows = session.execute(
        select(WebhookDelivery.status, func.count())
        .where(WebhookDelivery.client_id == client_id)
        .group_by(WebhookDelivery.status)
    )
    # .all(): a Result has .keys() and would be taken for a mapping by dict().
    return dict(rows.all())


def database_levels(session: Session, *, now: datetime) -> DatabaseLevels:
    """Tasks by state, deliveries by status and the deliveries due: the gauges of `/metrics`."""
    # .all(): a Result has .keys() and would be taken for a mapping by dict().
    by_state = dict(session.execute(select(Task.state, func.count()).group_by(Task.state)).all())
    by_status = dict(
        session.execute(
            select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
        ).all()
    )
    due = session.scalar(
        select(func.count()).where(
            WebhookDelivery.status == DELIVERY_PENDING, WebhookDelivery.next_attempt_at <= now
        )
    )
    destinations = dict(
        session.execute(
            select(WebhookDestination.state, func.count()).group_by(WebhookDestination.state)
        ).all()
    )
    held = session.scalar(
        select(func.count())
        .select_from(WebhookDelivery)
        .join(
            WebhookDestination,
            and_(
                WebhookDestination.client_id == WebhookDelivery.client_id,
                WebhookDestination.origin == WebhookDelivery.destination,
            ),
        )
        .where(
            WebhookDelivery.status == DELIVERY_PENDING,
            WebhookDestination.state != DESTINATION_HEALTHY,
        )
    )
    return DatabaseLevels(by_state, by_status, due or 0, destinations, held or 0)
