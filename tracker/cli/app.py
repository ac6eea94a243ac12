"""The `tracker` command: run the service's roles; `clients`, `tasks`, `deliveries` groups."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tracker.cli.clients import clients_app
from tracker.cli.common import console, err_console, load_cli_settings, print_json
from tracker.cli.deliveries import deliveries_app
from tracker.cli.destinations import destinations_app
from tracker.cli.prune import prune
from tracker.cli.tasks import tasks_app

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
app.add_typer(clients_app, name="clients", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks", no_args_is_help=True)
app.add_typer(deliveries_app, name="deliveries", no_args_is_help=True)
app.add_typer(destinations_app, name="destinations", no_args_is_help=True)


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
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Serving processes (uvicorn workers) sharing the port; each has its own "
            "database connections and request threads.",
        ),
    ] = 1,
) -> None:
    """Run the HTTP API on TRACKER_API_HOST:TRACKER_API_PORT (docs at /docs)."""
    import uvicorn

    from tracker.api import create_app
    from tracker.observability.logs import configure_logging
    from tracker.observability.metrics import share_between_processes

    settings = load_cli_settings()
    configure_logging(settings)
    # Every request is logged once, with its trace id, by the API itself.
    serving: dict[str, Any] = {
        "host": host or settings.api_host,
        "port": settings.api_port if port is None else port,
        "log_config": None,
        "access_log": False,
    }
    if workers == 1:
        uvicorn.run(create_app(settings), **serving)
        return
    # Each process counts its own requests; /metrics, whichever answers, shows them all.
    share_between_processes()
    uvicorn.run("tracker.api.app:create_served_app", factory=True, workers=workers, **serving)


@app.command()
def services(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print what GET /v1/services answers.")
    ] = False,
) -> None:
    """The AceData task services this tracker knows and their profiles: where each keeps
    its state word, its progress and artifacts, and the pace its fresh tasks are polled at.
    A service not listed is tracked by the generic rules."""
    from tracker.cli.views import services_table
    from tracker.polling.schedule import fresh_interval
    from tracker.profiles import PROFILES, service_listing

    listing = service_listing()
    if as_json:
        print_json({"items": listing})
        return
    settings = load_cli_settings()
    by_name = {profile.service: profile for profile in PROFILES}
    rows = [
        {
            **item,
            "state_at": by_name[item["service"]].state_at,
            "poll_interval": fresh_interval(item["service"], settings),
        }
        for item in listing
    ]
    console.print(services_table(rows))


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
    """Run the whole service: migrate, then API, worker and beat together (Ctrl-C or
    SIGTERM stops all)."""
    import os

    from tracker.db import migrate as migrations
    from tracker.worker.roles import Supervisor

    settings = load_cli_settings()
    env = dict(os.environ)
    if with_simulator:
        env["TRACKER_UPSTREAM_URL"] = "http://127.0.0.1:8099"
        if settings.upstream_token is None:  # unset or empty
            env["TRACKER_UPSTREAM_TOKEN"] = "simulator"
    elif settings.upstream_token is None:
        err_console.print(
            "[yellow]TRACKER_UPSTREAM_TOKEN is not set:[/yellow] the upstream will reject "
            "every poll. Set it, or try `tracker up --with-simulator` to poll the local "
            "simulator instead of AceData."
        )
    migrations.upgrade(settings.database_url)
    supervisor = Supervisor(env=env)
    # SIGTERM (a service manager, `timeout`, `docker stop`) and SIGHUP stop the whole
    # tree as Ctrl-C does.
    supervisor.handle_signals()
    try:
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
        console.print("Ctrl-C (or SIGTERM) stops everything.")
        exited = supervisor.wait()
        err_console.print(f"[red]{exited} exited; stopping the others[/red]")
        code = 1
    except KeyboardInterrupt:
        err_console.print("stopping API, worker and beat")
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
    linger: Annotated[
        float,
        typer.Option(help="Keep everything running this many seconds after the end, to browse."),
    ] = 0.0,
) -> None:
    """The whole loop on this machine: simulator, tracker and a webhook receiver, live; the
    dashboard's sign-in link is printed at the start."""
    from tracker.devtools.demo import run_demo

    raise typer.Exit(
        run_demo(
            console,
            tasks=tasks,
            max_duration=max_duration,
            stall_timeout=stall_timeout,
            timeout=timeout,
            linger=linger,
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


app.command("prune")(prune)
