"""The `tracker` command: run the service's roles, manage clients, tasks and deliveries."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from tracker.config import ConfigError, Settings, get_settings
from tracker.errors import TrackerError

app = typer.Typer(
    help=(
        "tracker watches AceData generation tasks and sends signed webhooks when they "
        "complete, fail or time out. Start with `tracker up` (the whole service) or "
        "`tracker demo` (the whole loop against a local simulator)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
clients_app = typer.Typer(help="Applications that register tasks: API keys and webhook secrets.")
tasks_app = typer.Typer(help="Tracked tasks: register one from the shell, list, show history.")
app.add_typer(clients_app, name="clients", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks", no_args_is_help=True)
deliveries_app = typer.Typer(help="Webhook deliveries: list them, retry one by hand.")
app.add_typer(deliveries_app, name="deliveries", no_args_is_help=True)

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


@app.command()
def migrate() -> None:
    """Create or upgrade the history database (`alembic upgrade head` on TRACKER_DATABASE_URL)."""
    from tracker.db import migrate as migrations

    settings = load_cli_settings()
    migrations.upgrade(settings.database_url)
    console.print("[green]database is up to date[/green]")


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
) -> None:
    """Run the HTTP API on TRACKER_API_HOST:TRACKER_API_PORT (docs at /docs)."""
    import uvicorn

    from tracker.api import create_app
    from tracker.observability.logs import configure_logging

    settings = load_cli_settings()
    configure_logging(settings)
    # Every request is logged once, with its trace id, by the API itself.
    uvicorn.run(
        create_app(settings),
        host=host or settings.api_host,
        port=settings.api_port if port is None else port,
        log_config=None,
        access_log=False,
    )


@app.command()
def worker(
    concurrency: Annotated[
        int, typer.Option(help="Jobs at once; threads suit jobs that wait on the network.")
    ] = 16,
    pool: Annotated[str, typer.Option(help="Celery pool: threads, prefork or solo.")] = "threads",
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues: ticks (beat), polls, deliveries.")
    ] = "ticks,polls,deliveries",
) -> None:
    """Run a worker: polls the upstream and delivers webhooks. Run as many as you like."""
    from tracker.observability.metrics import serve_worker_metrics
    from tracker.worker.roles import run_worker

    settings = load_cli_settings()
    if settings.metrics_port and not serve_worker_metrics(settings.metrics_port):
        err_console.print(
            f"[yellow]TRACKER_METRICS_PORT {settings.metrics_port} is taken[/yellow] (another "
            "worker on this host?): this worker serves no metrics; give each its own port."
        )
    run_worker(
        concurrency=concurrency,
        pool=pool,
        queues=[q.strip() for q in queues.split(",") if q.strip()],
        loglevel=settings.log_level,
    )


@app.command()
def beat() -> None:
    """Run the scheduler: a poll tick every second, a sweep every TRACKER_SWEEP_INTERVAL."""
    from tracker.worker.roles import run_beat

    settings = load_cli_settings()
    run_beat(loglevel=settings.log_level)


@app.command()
def up(
    with_simulator: Annotated[
        bool,
        typer.Option(
            "--with-simulator",
            help="Also start the simulator on port 8099 and poll it instead of AceData.",
        ),
    ] = False,
) -> None:
    """Run the whole service: migrate, then API, worker and beat together (Ctrl-C stops all)."""
    import os

    from tracker.db import migrate as migrations
    from tracker.worker.roles import Supervisor

    settings = load_cli_settings()
    env = dict(os.environ)
    if with_simulator:
        env["TRACKER_UPSTREAM_URL"] = "http://127.0.0.1:8099"
        env.setdefault("TRACKER_UPSTREAM_TOKEN", "simulator")
    elif settings.upstream_token is None:
        err_console.print(
            "[yellow]TRACKER_UPSTREAM_TOKEN is not set:[/yellow] the upstream will reject "
            "every poll. Set it, or try `tracker up --with-simulator` to poll the local "
            "simulator instead of AceData."
        )
    migrations.upgrade(settings.database_url)
    supervisor = Supervisor(env=env)
    if with_simulator:
        supervisor.start("simulator", ["simulator", "--port", "8099"])
    supervisor.start("api", ["api"])
    supervisor.start("worker", ["worker"])
    supervisor.start("beat", ["beat"])
    console.print(f"API       http://{settings.api_host}:{settings.api_port}  (docs at /docs)")
    if settings.metrics_port:
        console.print(f"metrics   worker at http://127.0.0.1:{settings.metrics_port}/metrics")
    console.print(f"database  {settings.database_url}")
    broker = "embedded (" + settings.effective_broker_url + ")"
    console.print(f"broker    {settings.broker_url or broker}")
    if with_simulator:
        console.print("upstream  simulator at http://127.0.0.1:8099")
    console.print("Ctrl-C stops everything.")
    try:
        exited = supervisor.wait()
        err_console.print(f"[red]{exited} exited; stopping the others[/red]")
        code = 1
    except KeyboardInterrupt:
        code = 0
    finally:
        supervisor.stop()
    raise typer.Exit(code)


@app.command()
def demo(
    tasks: Annotated[int, typer.Option(min=2, max=8, help="How many video tasks to run.")] = 6,
    max_duration: Annotated[
        float, typer.Option(help="Longest simulated generation, in seconds.")
    ] = 12.0,
    stall_timeout: Annotated[
        int, typer.Option(help="Deadline of the task that stalls, in seconds.")
    ] = 20,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 180.0,
) -> None:
    """The whole loop on this machine: simulator, tracker and a webhook receiver, live."""
    from tracker.devtools.demo import run_demo

    raise typer.Exit(
        run_demo(
            console,
            tasks=tasks,
            max_duration=max_duration,
            stall_timeout=stall_timeout,
            timeout=timeout,
        )
    )


@app.command()
def simulator(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8099,
    token: Annotated[
        list[str] | None,
        typer.Option(
            metavar="TOKEN",
            help="Accept only this bearer token (repeat for several). Default: any.",
        ),
    ] = None,
    duration: Annotated[
        str | None,
        typer.Option(metavar="MIN:MAX", help="Seconds a new task takes to settle. Default 5:20."),
    ] = None,
    failure_share: Annotated[
        float | None, typer.Option(help="Share of new tasks that fail (0-1). Default 0.1.")
    ] = None,
    stall_share: Annotated[
        float | None, typer.Option(help="Share of new tasks that never finish. Default 0.")
    ] = None,
    latency: Annotated[
        float | None, typer.Option(help="Seconds added before every answer. Default 0.")
    ] = None,
    error_429_share: Annotated[
        float | None,
        typer.Option("--error-429-share", help="Share of requests answered 429. Default 0."),
    ] = None,
    error_500_share: Annotated[
        float | None,
        typer.Option("--error-500-share", help="Share of requests answered 500. Default 0."),
    ] = None,
    batch_cap: Annotated[
        int | None,
        typer.Option(help="Most items per retrieve_batch answer; the rest are left out."),
    ] = None,
    rate_limit_rps: Annotated[
        int | None,
        typer.Option(help="Requests per second per token; more answer 429. Default: no limit."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed, to repeat a run exactly.")] = None,
) -> None:
    """A local stand-in for AceData's task APIs, to test against without spending credits.

    Create a task with `POST /luma/videos` (any JSON body), then poll it with
    `POST /luma/tasks` as AceData documents (`retrieve`, `retrieve_batch`).
    Tasks settle after a random duration, as completed or failed. Change knobs
    at run time with `PUT /_sim/config`; see counters at `GET /_sim/stats`.
    """
    from pydantic import ValidationError

    from tracker.devtools.simulator import SimulatorConfig, serve

    knobs: dict[str, object] = {
        "tokens": token or None,
        "failure_share": failure_share,
        "stall_share": stall_share,
        "latency": latency,
        "error_429_share": error_429_share,
        "error_500_share": error_500_share,
        "batch_cap": batch_cap,
        "rate_limit_rps": rate_limit_rps,
        "seed": seed,
    }
    if duration is not None:
        shortest, _, longest = duration.partition(":")
        knobs["duration_min"], knobs["duration_max"] = shortest, longest or shortest
    try:
        config = SimulatorConfig.model_validate(
            {name: value for name, value in knobs.items() if value is not None}
        )
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "options"
            err_console.print(f"[red]error:[/red] {field}: {error['msg']}")
        raise typer.Exit(2) from None
    console.print(f"simulator on http://{host}:{port}  (Ctrl-C stops it)")
    console.print(f"  create a task  POST http://{host}:{port}/luma/videos")
    console.print(f"  poll it        POST http://{host}:{port}/luma/tasks")
    console.print(f"  counters       GET  http://{host}:{port}/_sim/stats")
    console.print(f"  API docs       http://{host}:{port}/docs")
    serve(host, port, config)


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
