"""What every command shares: consoles, settings read with a clean exit, one transaction."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from sqlalchemy.orm import Session

from tracker.config import Settings, get_settings
from tracker.errors import ConfigError, TrackerError

console = Console()
err_console = Console(stderr=True)


def load_cli_settings() -> Settings:
    """The settings, or a clean exit naming the bad variable."""
    try:
        return get_settings()
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@contextmanager
def cli_transaction() -> Iterator[Session]:
    """One committed unit of work; tracker errors end the command with their message."""
    from tracker.db.engine import transaction

    load_cli_settings()
    try:
        with transaction() as session:
            yield session
    except TrackerError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None


def print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
