"""`tracker prune`: retention by hand."""

from __future__ import annotations

from typing import Annotated

import typer

from tracker.cli.common import cli_transaction, console, err_console, load_cli_settings


def prune(
    older_than: Annotated[
        float | None,
        typer.Option(min=0, help="Days a terminal task is kept (default: TRACKER_RETENTION_DAYS)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be removed.")
    ] = False,
) -> None:
    """Remove tasks terminal for longer than --older-than days, with their transitions,
    deliveries and attempts, in batches; prints what it removes."""
    from datetime import timedelta

    from tracker.clock import utcnow
    from tracker.db.engine import get_engine
    from tracker.tracking.retention import prune_history

    settings = load_cli_settings()
    days = settings.retention_days if older_than is None else older_than
    if not days:
        err_console.print(
            "[red]error:[/red] --older-than: say how many days to keep, or set "
            "TRACKER_RETENTION_DAYS (0, the default, keeps the history for ever)"
        )
        raise typer.Exit(2)
    with cli_transaction():
        pruned = prune_history(
            get_engine(), older_than=timedelta(days=days), now=utcnow(), dry_run=dry_run
        )
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{verb}: {pruned.tasks} tasks terminal for more than {days:g} days, "
        f"{pruned.transitions} transitions, {pruned.deliveries} deliveries, "
        f"{pruned.attempts} attempts, {pruned.operational_events} operational events"
    )
