"""`tracker clients`: applications that register tasks, their API keys and webhook secrets."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import select

from tracker.cli.common import cli_transaction, console, load_cli_settings, print_json

clients_app = typer.Typer(help="Applications that register tasks: API keys and webhook secrets.")


@clients_app.command("create")
def clients_create(
    name: Annotated[str, typer.Argument(help="A name for the application, e.g. `shop-backend`.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Create a client; prints its API key and webhook secret once (they cannot be shown again)."""
    from tracker.tracking.clients import create_client

    with cli_transaction() as session:
        new = create_client(session, name)
    if as_json:
        print_json({"name": name, "api_key": new.api_key, "webhook_secret": new.webhook_secret})
        return
    console.print(f"client [bold]{name}[/bold] created. Store these now, they are shown once:")
    console.print(f"  API key:        {new.api_key}")
    console.print(f"  webhook secret: {new.webhook_secret}")


@clients_app.command("list")
def clients_list() -> None:
    """List clients with their key prefix and signing secrets in force."""
    from tracker.db.models import Client
    from tracker.tracking.clients import active_secrets

    with cli_transaction() as session:
        clients = session.scalars(select(Client).order_by(Client.name)).all()
        table = Table("name", "API key", "secrets in force", "created")
        for client in clients:
            table.add_row(
                client.name,
                client.api_key_prefix + "…",
                str(len(active_secrets(client))),
                client.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            )
    console.print(table)


@clients_app.command("rotate-secret")
def clients_rotate_secret(
    name: Annotated[str, typer.Argument(help="The client whose webhook secret to rotate.")],
) -> None:
    """Add a new webhook secret; the old one keeps signing for TRACKER_SECRET_ROTATION_GRACE s."""
    from tracker.tracking.clients import get_client, rotate_secret

    settings = load_cli_settings()
    with cli_transaction() as session:
        client = get_client(session, name)
        secret = rotate_secret(session, client, grace_seconds=settings.secret_rotation_grace)
    console.print(f"new webhook secret for [bold]{name}[/bold] (shown once): {secret}")
    console.print(
        f"the old secret stays valid for {settings.secret_rotation_grace} s; during that "
        "time every webhook carries both signatures."
    )


@clients_app.command("set")
def clients_set(
    name: Annotated[str, typer.Argument(help="The client to change.")],
    default_callback: Annotated[
        str | None,
        typer.Option(help="Callback URL of registrations that give none; '' unsets it."),
    ] = None,
    default_events: Annotated[
        str | None,
        typer.Option(help="Comma-separated events of registrations that give none; '' unsets."),
    ] = None,
    operations_url: Annotated[
        str | None, typer.Option(help="Where operational events go; '' unsets it.")
    ] = None,
) -> None:
    """Set a client's registration defaults and operations URL (`PATCH /v1/client`)."""
    from tracker.tracking.clients import client_settings, get_client, update_client_settings

    changes: dict[str, object] = {}
    if default_callback is not None:
        changes["default_callback_url"] = default_callback or None
    if default_events is not None:
        events = [event.strip() for event in default_events.split(",") if event.strip()]
        changes["default_events"] = events or None
    if operations_url is not None:
        changes["operations_url"] = operations_url or None
    with cli_transaction() as session:
        client = get_client(session, name)
        settings = client_settings(update_client_settings(session, client.id, changes))
    print_json(settings)
