"""`tracker deliveries`: list webhook deliveries, retry one by hand, replay many."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from tracker.cli.common import cli_transaction, console, print_json

deliveries_app = typer.Typer(help="Webhook deliveries: list them, retry one by hand.")


@deliveries_app.command("list")
def deliveries_list(
    status: Annotated[
        str | None, typer.Option(help="Only this status: pending, succeeded, failed, superseded.")
    ] = None,
    task_id: Annotated[str | None, typer.Option(help="Only this task's deliveries.")] = None,
    client_name: Annotated[
        str | None, typer.Option("--client", help="Only this client's (default: all).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Deliveries to show.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Continue after a previous page.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what the API answers.")] = False,
) -> None:
    """List webhook deliveries, newest first, as `GET /v1/deliveries` does."""
    from tracker.cli.views import deliveries_table
    from tracker.db.queries import delivery_resource, list_deliveries
    from tracker.tracking.clients import get_client

    with cli_transaction() as session:
        client_id = get_client(session, client_name).id if client_name else None
        page = list_deliveries(
            session, client_id=client_id, status=status, task_id=task_id, limit=limit, cursor=cursor
        )
        items = [delivery_resource(delivery) for delivery in page.items]
    if as_json:
        print_json({"items": items, "next_cursor": page.next_cursor})
        return
    console.print(deliveries_table(items))
    if page.next_cursor:
        console.print(f"more: --cursor {page.next_cursor}")


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: Annotated[str, typer.Argument(help="The delivery id (its `webhook-id`).")],
) -> None:
    """Deliver a webhook again now, with the same webhook-id; also after it failed for good."""
    from tracker.clock import utcnow
    from tracker.delivery.outbox import redeliver

    with cli_transaction() as session:
        delivery = redeliver(session, delivery_id, now=utcnow())
        event, attempts = delivery.event, delivery.attempts
    console.print(
        f"delivery {delivery_id} ({event}) is due again now, after {attempts} attempts so far; "
        "a worker sends it on its next sweep (`tracker deliveries list` shows the result)"
    )


def _moment(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 time from the command line (UTC if it names no zone)."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"must be an ISO 8601 time such as 2026-12-01T10:00:00Z (got {value!r})",
            param_hint=option,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@deliveries_app.command("replay")
def deliveries_replay(
    since: Annotated[
        str, typer.Option(help="Only deliveries created at or after this ISO 8601 time.")
    ],
    client_name: Annotated[str, typer.Option("--client", help="The client whose deliveries.")],
    until: Annotated[
        str | None, typer.Option(help="Only deliveries created at or before this time.")
    ] = None,
    status: Annotated[
        str | None, typer.Option(help="Only this status: pending, succeeded, failed.")
    ] = None,
    event: Annotated[str | None, typer.Option(help="Only this event, e.g. task.completed.")] = None,
    service: Annotated[str | None, typer.Option(help="Only this service's tasks.")] = None,
    task_id: Annotated[str | None, typer.Option(help="Only this task's deliveries.")] = None,
) -> None:
    """Deliver again every delivery matching the filter (at most 10,000), as
    `POST /v1/deliveries/replay` does: the same webhook-id, due now."""
    from tracker.clock import utcnow
    from tracker.delivery.replay import ReplayFilter, replay_deliveries
    from tracker.tracking.clients import get_client

    wanted = ReplayFilter(
        since=_moment(since, "--since") or utcnow(),
        until=_moment(until, "--until"),
        status=status,
        event=event,
        service=service,
        task_id=task_id,
    )
    with cli_transaction() as session:
        client = get_client(session, client_name)
        replayed = replay_deliveries(session, wanted, client_id=client.id, now=utcnow())
    console.print(
        f"{replayed} deliveries of {client_name} are due again now, each with its own "
        "webhook-id; workers send them on their next sweep"
    )
