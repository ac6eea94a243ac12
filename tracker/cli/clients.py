"""`tracker clients`: applications that register tasks, their API keys and webhook secrets."""

from __future__ import annotations

import getpass
import sys
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import select

from tracker.cli.common import cli_transaction, console, err_console, load_cli_settings, print_json

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
        table = Table("name", "API key", "secrets in force", "upstream token", "created")
        for client in clients:
            table.add_row(
                client.name,
                client.api_key_prefix + "…",
                str(len(active_secrets(client))),
                "own" if client.upstream_credential else "tracker's",
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


@clients_app.command("set-upstream-token")
def clients_set_upstream_token(
    name: Annotated[str, typer.Argument(help="The client whose own AceData token to set.")],
    clear: Annotated[
        bool, typer.Option("--clear", help="Remove it: the tracker's token is used again.")
    ] = False,
) -> None:
    """Read the client's own AceData token from standard input and store it encrypted with
    TRACKER_SECRET_KEY; its tasks are then polled (and submitted) with it, within a request
    budget of its own. The token is never shown again."""
    from tracker.tracking.clients import get_client
    from tracker.upstream.credentials import check_token, clear_client_token, set_client_token

    settings = load_cli_settings()
    if clear:
        with cli_transaction() as session:
            had = clear_client_token(session, get_client(session, name))
        console.print(
            f"client [bold]{name}[/bold]: "
            + ("own upstream token removed" if had else "had no upstream token of its own")
            + "; its tasks are polled with TRACKER_UPSTREAM_TOKEN"
        )
        return
    if sys.stdin.isatty():
        err_console.print("paste the AceData token, then press Enter (it is not echoed):")
        raw = getpass.getpass(prompt="")
    else:
        raw = sys.stdin.read()
    try:
        token = check_token(raw)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}; nothing was stored")
        raise typer.Exit(2) from None
    with cli_transaction() as session:
        set_client_token(session, get_client(session, name), token, settings=settings)
    console.print(
        f"client [bold]{name}[/bold]: upstream token stored, encrypted; its tasks are polled "
        "and submitted with it from the next tick"
    )


@clients_app.command("reencrypt-upstream-tokens")
def clients_reencrypt_upstream_tokens() -> None:
    """After adding a new first key to TRACKER_SECRET_KEY: encrypt every stored upstream token
    with it, so the old key can be removed."""
    from tracker.upstream.credentials import reencrypt_client_tokens

    settings = load_cli_settings()
    with cli_transaction() as session:
        count = reencrypt_client_tokens(session, settings=settings)
    console.print(
        f"{count} upstream tokens encrypted with the first key of TRACKER_SECRET_KEY; "
        "the other keys can now be removed"
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
