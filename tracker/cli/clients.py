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


@clients_app.command("sign-in-link")
def clients_sign_in_link(
    name: Annotated[str, typer.Argument(help="The client to sign in to the dashboard.")],
    base_url: Annotated[
        str | None,
        typer.Option(help="The dashboard's address; default http://TRACKER_API_HOST:PORT."),
    ] = None,
) -> None:
    """Print a one-time link that signs a browser in to the client's dashboard (`/ui`).

    The link works once, within 10 minutes; it carries a random token, not the API key.
    """
    from tracker.api.ui.sessions import create_sign_in_link_token
    from tracker.clock import utcnow
    from tracker.config import DASHBOARD_SIGN_IN_LINK_SECONDS
    from tracker.tracking.clients import get_client

    settings = load_cli_settings()
    base = (base_url or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")
    with cli_transaction() as session:
        token = create_sign_in_link_token(session, get_client(session, name), now=utcnow())
    console.print(f"{base}/ui/login?token={token}", soft_wrap=True)
    console.print(
        f"opens the dashboard as [bold]{name}[/bold]; works once, within "
        f"{DASHBOARD_SIGN_IN_LINK_SECONDS // 60} minutes",
        style="dim",
    )
