"""`tracker destinations`: where webhooks go, their circuit breakers, resuming one."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from tracker.cli.common import cli_transaction, console, print_json

destinations_app = typer.Typer(
    help="Webhook destinations (scheme, host, port): their state, resuming one."
)


@destinations_app.command("list")
def destinations_list(
    client_name: Annotated[
        str | None, typer.Option("--client", help="Only this client's (default: all).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what the API answers.")] = False,
) -> None:
    """List destinations with their state, failures, last success and held deliveries."""
    from tracker.delivery.destinations import list_destinations
    from tracker.tracking.clients import get_client

    with cli_transaction() as session:
        client_id = get_client(session, client_name).id if client_name else None
        items = list_destinations(session, client_id=client_id)
    if as_json:
        print_json({"items": items})
        return
    table = Table("id", "destination", "state", "failures", "last success", "held", "last error")
    for item in items:
        table.add_row(
            str(item["id"]),
            item["url"],
            item["state"],
            str(item["consecutive_failures"]),
            item["last_success_at"] or "-",
            str(item["held_deliveries"]),
            (item["last_error"] or "")[:60],
        )
    console.print(table)


@destinations_app.command("resume")
def destinations_resume(
    destination_id: Annotated[int, typer.Argument(help="The destination's id (`list` shows it).")],
) -> None:
    """Close an open or disabled destination now and release what it holds."""
    from tracker.clock import utcnow
    from tracker.delivery.destinations import resume_destination

    with cli_transaction() as session:
        destination = resume_destination(session, destination_id, client_id=None, now=utcnow())
        origin = destination.origin
    console.print(
        f"destination {destination_id} ({origin}) is healthy again; what it held is due now "
        "and workers send it on their next sweep"
    )
