"""`tracker deliveries`: list webhook deliveries, retry one by hand."""

from __future__ import annotations

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
