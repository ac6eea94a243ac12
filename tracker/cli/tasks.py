"""`tracker tasks`: register a task from the shell, list tasks, show one's history."""

from __future__ import annotations

from typing import Annotated

import typer

from tracker.cli.common import cli_transaction, console, err_console, print_json

tasks_app = typer.Typer(help="Tracked tasks: register one from the shell, list, show history.")


@tasks_app.command("add")
def tasks_add(
    task_id: Annotated[str, typer.Argument(help="The upstream task id to track.")],
    client_name: Annotated[str, typer.Option("--client", help="The client that owns it.")],
    service: Annotated[str, typer.Option(help="Upstream service.")] = "luma",
    callback: Annotated[
        str | None, typer.Option(help="Webhook URL; without it nothing is sent.")
    ] = None,
    timeout: Annotated[
        int | None, typer.Option(help="Seconds before timed_out; default TRACKER_TASK_TIMEOUT.")
    ] = None,
) -> None:
    """Register a task for tracking, as `POST /v1/tasks` would."""
    from pydantic import ValidationError

    from tracker.tracking.clients import get_client
    from tracker.tracking.registration import register_task
    from tracker.tracking.schemas import TaskRegistration

    try:
        registration = TaskRegistration(
            task_id=task_id, service=service, callback_url=callback, timeout_seconds=timeout
        )
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            err_console.print(f"[red]error:[/red] {field}: {error['msg']}")
        raise typer.Exit(2) from None
    with cli_transaction() as session:
        client = get_client(session, client_name)
        result = register_task(session, client, registration)
    verb = "registered" if result.created else "already registered"
    console.print(f"{verb}: {service}/{task_id} (state {result.task.state})")


@tasks_app.command("list")
def tasks_list(
    state: Annotated[str | None, typer.Option(help="Only tasks in this state.")] = None,
    service: Annotated[str | None, typer.Option(help="Only this service.")] = None,
    client_name: Annotated[
        str | None, typer.Option("--client", help="Only this client's tasks (default: all).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Tasks to show.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Continue after a previous page.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what the API answers.")] = False,
) -> None:
    """List tracked tasks, newest first, as `GET /v1/tasks` does."""
    from tracker.cli.views import tasks_table
    from tracker.db.queries import list_tasks, task_resource
    from tracker.tracking.clients import get_client

    with cli_transaction() as session:
        client_id = get_client(session, client_name).id if client_name else None
        page = list_tasks(
            session, client_id=client_id, state=state, service=service, limit=limit, cursor=cursor
        )
        items = [task_resource(task) for task in page.items]
        owners = None if client_name else [task.client.name for task in page.items]
    if as_json:
        print_json({"items": items, "next_cursor": page.next_cursor})
        return
    console.print(tasks_table(items, client_names=owners))
    if page.next_cursor:
        console.print(f"more: --cursor {page.next_cursor}")


@tasks_app.command("show")
def tasks_show(
    task_id: Annotated[str, typer.Argument(help="The upstream task id.")],
    service: Annotated[str, typer.Option(help="Upstream service.")] = "luma",
    client_name: Annotated[
        str | None, typer.Option("--client", help="The client that registered it.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print what the API answers.")] = False,
) -> None:
    """Show one task: its settings, its history as a timeline, and its webhooks."""
    from tracker.cli.views import task_timeline
    from tracker.db.queries import find_tasks, task_detail
    from tracker.tracking.clients import get_client

    with cli_transaction() as session:
        client_id = get_client(session, client_name).id if client_name else None
        found = find_tasks(session, task_id, service=service, client_id=client_id)
        owners = [task.client.name for task in found]
        details = [task_detail(task) for task in found]
    if not found:
        err_console.print(
            f"[red]error:[/red] no task {task_id!r} of service {service!r} is tracked"
        )
        raise typer.Exit(1)
    if len(found) > 1:
        err_console.print(
            f"[red]error:[/red] task {task_id!r} is registered by several clients "
            f"({', '.join(owners)}); choose one with --client"
        )
        raise typer.Exit(1)
    if as_json:
        print_json(details[0])
        return
    console.print(task_timeline(details[0], client_name=owners[0]))
