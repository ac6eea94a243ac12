"""Rich renderings of the history for the CLI: task and delivery tables, a task's timeline.

They take the resource dicts of `tracker.db.queries` (what the API answers), so a
table shows exactly what `--json` would print.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

STATE_STYLES = {
    "pending": "yellow",
    "running": "cyan",
    "completed": "green",
    "failed": "red",
    "timed_out": "magenta",
    "cancelled": "dim",
    "succeeded": "green",
    "superseded": "dim",
}


def _when(moment: str | None) -> str:
    """`2024-08-31T04:12:46.241000Z` as `2024-08-31 04:12:46`, short enough for a table."""
    if moment is None:
        return "-"
    return moment[:19].replace("T", " ")


def _state(word: str | None) -> Text:
    return Text(word or "-", style=STATE_STYLES.get(word or "", ""))


def _failure(failure: dict[str, str] | None) -> str:
    return "" if failure is None else f"{failure['code']}: {failure['message']}"


def tasks_table(tasks: list[dict[str, Any]], *, client_names: list[str] | None = None) -> Table:
    """Tasks, one row each; a `client` column when they come from several clients."""
    table = Table("task_id", "service", "state", "upstream", "created", "finished", "polls")
    if client_names is not None:
        table.add_column("client")
    table.add_column("failure", overflow="fold")
    for index, task in enumerate(tasks):
        row: list[RenderableType] = [
            task["task_id"],
            task["service"],
            _state(task["state"]),
            task["upstream_state"] or "-",
            _when(task["created_at"]),
            _when(task["finished_at"]),
            str(task["polls"]),
        ]
        if client_names is not None:
            row.append(client_names[index])
        row.append(_failure(task["failure"]))
        table.add_row(*row)
    return table


def task_timeline(task: dict[str, Any], *, client_name: str) -> Group:
    """One task: its settings, its transitions as a timeline, and its deliveries."""
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("task", f"{task['service']}/{task['task_id']}")
    summary.add_row("client", client_name)
    summary.add_row("state", _state(task["state"]))
    summary.add_row("callback", task["callback_url"] or "- (no webhooks)")
    summary.add_row("events", ", ".join(task["events"]) or "-")
    summary.add_row("deadline", _when(task["deadline_at"]))
    summary.add_row("polls", str(task["polls"]))
    if task["failure"] is not None:
        summary.add_row("failure", _failure(task["failure"]))

    timeline = Table(title="history", title_justify="left", show_edge=False)
    timeline.add_column("observed (UTC)")
    timeline.add_column("transition")
    timeline.add_column("upstream said")
    for step in task["transitions"]:
        change = Text.assemble(
            _state(step["from_state"]) if step["from_state"] else Text("(registered)", "dim"),
            " -> ",
            _state(step["to_state"]),
        )
        timeline.add_row(_when(step["observed_at"]), change, step["upstream_state"] or "")

    parts: list[RenderableType] = [summary, Text(), timeline]
    if task["deliveries"]:
        parts += [Text(), deliveries_table(task["deliveries"], title="webhooks")]
    return Group(*parts)


def deliveries_table(deliveries: list[dict[str, Any]], *, title: str | None = None) -> Table:
    """Deliveries, one row each (the summaries of a task, or the listing's items)."""
    listing = bool(deliveries) and "task_id" in deliveries[0]
    table = Table(title=title, title_justify="left", show_edge=title is None)
    # The id is what `tracker deliveries retry` takes: never shortened.
    table.add_column("id", no_wrap=True, min_width=36)
    if listing:
        table.add_column("task")
    for name in ("event", "status", "attempts", "last code", "next attempt", "delivered"):
        table.add_column(name)
    table.add_column("failure", overflow="fold")
    for delivery in deliveries:
        row: list[RenderableType] = [delivery["id"]]
        if listing:
            row.append(f"{delivery['service']}/{delivery['task_id']}")
        code = delivery["last_status_code"]
        row += [
            delivery["event"],
            _state(delivery["status"]),
            str(delivery["attempts"]),
            "-" if code is None else str(code),
            _when(delivery["next_attempt_at"]),
            _when(delivery["delivered_at"]),
            _failure(delivery["failure"]),
        ]
        table.add_row(*row)
    return table


def services_table(services: list[dict[str, Any]]) -> Table:
    """The services and their profiles, one row each."""
    table = Table(title="services (others: the generic rules)")
    for column in ("service", "endpoint", "state word at", "progress", "outputs", "fresh poll"):
        table.add_column(column)
    for item in services:
        state_at = item["state_at"]
        where = ", ".join(state_at) if state_at else "none: finished_at / success"
        table.add_row(
            item["service"],
            item["endpoint"],
            where,
            "yes" if item["progress"] else "",
            ", ".join(item["outputs"]) or "(the record)",
            f"{item['poll_interval']:g} s",
        )
    return table
