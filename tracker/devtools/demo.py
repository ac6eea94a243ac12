"""`tracker demo`: the whole loop on one machine, with live progress.

Starts the simulator (as the upstream), the tracker's API, worker and beat on
the embedded defaults (SQLite, embedded broker) and a small webhook receiver
that verifies every signature; creates a demo client, seeds a handful of tasks
(a Luma video, a Suno song and a Midjourney image side by side, then videos of
which some fail and one stalls past its deadline), registers them through the
API, and shows states, progress, outputs and webhooks as they arrive until every
task is final.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tracker.api.ui.sessions import create_sign_in_link_token
from tracker.clock import utcnow
from tracker.db import migrate
from tracker.db.engine import make_engine, transaction
from tracker.delivery.signing import verify
from tracker.errors import SignatureError
from tracker.tracking.clients import create_client
from tracker.worker.roles import Supervisor

PROMPTS = (
    "Astronauts shuttle from space to volcano",
    "A paper boat sails down a rainy street",
    "Time-lapse of a city skyline at dusk",
    "A fox runs through fresh snow",
    "Waves crash on a lighthouse in a storm",
    "A hummingbird drinks from a red flower",
    "Northern lights over a frozen lake",
    "A steam train crosses a stone bridge",
)
TOKEN = "demo-token"
# The first tasks: one of each family, side by side, each with its artifacts.
SHOWCASE = (
    ("luma", "A fox runs through fresh snow"),
    ("suno", "A song for a winter morning"),
    ("midjourney", "A lighthouse in a storm, oil on canvas"),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Received:
    """Webhooks the demo receiver got, by task id."""

    secret: str
    events: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, headers: dict[str, str], body: bytes) -> None:
        try:
            verify(self.secret, headers, body)
            verified = True
        except SignatureError:
            verified = False
        payload = json.loads(body)
        with self.lock:
            self.events.setdefault(payload["data"]["task_id"], []).append(
                (payload["type"], verified)
            )

    def count(self) -> tuple[int, int]:
        with self.lock:
            all_events = [e for events in self.events.values() for e in events]
        return len(all_events), sum(1 for _, ok in all_events if ok)


def start_receiver(received: Received) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.add(dict(self.headers.items()), body)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the live table shows what arrives

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def wait_for(url: str, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s")


def progress_table(
    tasks: list[dict[str, Any]], received: Received, prompts: dict[str, str]
) -> Table:
    table = Table(title="tracker demo: tasks and webhooks", expand=False)
    for column in ("task", "service", "prompt", "state", "progress", "outputs", "webhooks"):
        table.add_column(column)
    colours = {"completed": "green", "failed": "red", "timed_out": "yellow", "running": "cyan"}
    for task in tasks:
        events = received.events.get(task["task_id"], [])
        hooks = ", ".join(f"{event}{'' if ok else ' (BAD SIGNATURE)'}" for event, ok in events)
        colour = colours.get(task["state"], "white")
        progress = task.get("progress")
        outputs = ", ".join(output["type"] for output in task.get("outputs", []))
        table.add_row(
            task["task_id"][:8],
            task["service"],
            prompts.get(task["task_id"], "")[:28],
            f"[{colour}]{task['state']}[/{colour}]" + _word(task.get("upstream_state")),
            "-" if progress is None else f"{progress} %",
            outputs or "-",
            hooks or "-",
        )
    total, verified = received.count()
    table.caption = f"webhooks received: {total}, verified: {verified}"
    return table


def _word(upstream_state: str | None) -> str:
    return f" ({upstream_state})" if upstream_state else ""


def run_demo(
    console: Console,
    *,
    tasks: int = 6,
    max_duration: float = 12.0,
    stall_timeout: int = 20,
    timeout: float = 180.0,
    workdir: Path | None = None,
    linger: float = 0.0,
) -> int:
    """Run the demo; returns the exit code (0: every task final, every webhook verified).

    The dashboard's one-time sign-in link is printed once the API is up; `linger` keeps
    everything running that many seconds after the end, to look around in it.
    """
    workdir = workdir or Path(tempfile.mkdtemp(prefix="tracker-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics").mkdir(exist_ok=True)
    database_url = f"sqlite:///{workdir / 'tracker.db'}"
    sim_port, api_port = free_port(), free_port()
    sim_url, api_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{api_port}"

    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    with transaction(engine) as session:
        demo = create_client(session, f"demo-{os.getpid()}")
        # Redeemed at most once, within DASHBOARD_SIGN_IN_LINK_SECONDS; never the API key.
        sign_in_token = create_sign_in_link_token(session, demo.client, now=utcnow())
    engine.dispose()
    received = Received(demo.webhook_secret)
    receiver = start_receiver(received)
    callback = f"http://127.0.0.1:{receiver.server_address[1]}/hooks"

    env = {key: value for key, value in os.environ.items() if not key.startswith("TRACKER_")} | {
        "TRACKER_DATABASE_URL": database_url,
        "TRACKER_UPSTREAM_URL": sim_url,
        "TRACKER_UPSTREAM_TOKEN": TOKEN,
        "TRACKER_POLL_INTERVAL": "1",
        "TRACKER_MAX_POLL_INTERVAL": "2",
        # Songs are polled every 10 s by default (the vendor's advice); a demo is short.
        "TRACKER_SERVICE_POLL_INTERVALS": "suno=1",
        "TRACKER_SWEEP_INTERVAL": "1",
        "TRACKER_WEBHOOK_ALLOW_PRIVATE": "true",
        "TRACKER_API_PORT": str(api_port),
        "TRACKER_METRICS_PORT": "0",
        "TRACKER_LOG_FORMAT": "json",
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "metrics"),
    }
    supervisor = Supervisor(env=env, log_dir=workdir)
    console.print(f"[bold]tracker demo[/bold]: working in {workdir}")
    supervisor.handle_signals()  # SIGTERM and SIGHUP stop every child too, as Ctrl-C does
    try:
        supervisor.start("simulator", ["simulator", "--port", str(sim_port), "--token", TOKEN])
        supervisor.start("api", ["api"])
        supervisor.start("worker", ["worker", "--concurrency", "8"])
        supervisor.start("beat", ["beat"])
        wait_for(f"{sim_url}/_sim/stats")
        wait_for(f"{api_url}/healthz")
        console.print(f"simulator {sim_url}   API {api_url}/docs   receiver {callback}")
        console.print(
            f"dashboard: [link]{api_url}/ui/login?token={sign_in_token}[/link]  "
            "(signs you in as the demo client; the link works once)",
            soft_wrap=True,
        )

        showcase = SHOWCASE[: max(0, tasks - 1)]
        plan = [
            {
                "service": service,
                "outcome": "completed",
                "duration": 3 + max_duration * (n + 1) / tasks,
                "prompt": prompt,
            }
            for n, (service, prompt) in enumerate(showcase)
        ]
        outcomes = ["failed", "completed"] * tasks
        plan += [
            {
                "service": "luma",
                "outcome": outcome,
                "duration": 3 + max_duration * n / tasks,
                "prompt": PROMPTS[n % len(PROMPTS)],
            }
            for n, outcome in enumerate(outcomes[: tasks - 1 - len(showcase)])
        ]
        plan.append(
            {
                "service": "luma",
                "outcome": "stall",
                "duration": max_duration,
                "prompt": PROMPTS[(tasks - 1) % len(PROMPTS)],
            }
        )
        answer = requests.post(f"{sim_url}/_sim/tasks", json={"tasks": plan}, timeout=10)
        answer.raise_for_status()
        ids: list[str] = answer.json()["ids"]
        prompts = {task_id: str(step["prompt"]) for task_id, step in zip(ids, plan, strict=True)}

        auth = {"authorization": f"Bearer {demo.api_key}"}
        services = {task_id: str(step["service"]) for task_id, step in zip(ids, plan, strict=True)}
        registrations = [
            {
                "task_id": task_id,
                "service": services[task_id],
                "callback_url": callback,
                "metadata": {"prompt": prompts[task_id]},
                "events": ["task.running", "task.completed", "task.failed", "task.timed_out"],
            }
            | ({"timeout_seconds": stall_timeout} if n == len(ids) - 1 else {})
            for n, task_id in enumerate(ids)
        ]
        requests.post(
            f"{api_url}/v1/tasks/batch", json={"tasks": registrations}, headers=auth, timeout=10
        ).raise_for_status()

        deadline = time.monotonic() + timeout
        listed: list[dict[str, Any]] = []
        with Live(console=console, refresh_per_second=4) as live:
            while time.monotonic() < deadline:
                page = requests.get(f"{api_url}/v1/tasks", headers=auth, timeout=10).json()
                listed = sorted(page["items"], key=lambda t: ids.index(t["task_id"]))
                live.update(progress_table(listed, received, prompts))
                if _finished(listed, received):
                    break
                time.sleep(0.5)
        if not _finished(listed, received):
            console.print("[red]the demo did not finish in time; logs are in[/red] " + str(workdir))
            return 1

        console.print("\n[bold]outputs[/bold], one shape for every service:")
        for task in listed:
            for output in task["outputs"]:
                details = ", ".join(
                    f"{key} {output[key]}"
                    for key in ("width", "height", "duration", "title")
                    if key in output
                )
                console.print(
                    f"  {task['service']:<10} {output['type']:<5} {output['url']}"
                    + (f"  ({details})" if details else "")
                )
        shown = next(t for t in listed if t["state"] == "completed")
        detail = requests.get(
            f"{api_url}/v1/tasks/{shown['task_id']}",
            params={"service": shown["service"]},
            headers=auth,
            timeout=10,
        ).json()
        console.print(f"\nhistory of {shown['task_id']} ({prompts[shown['task_id']]}):")
        for step in detail["transitions"]:
            console.print(
                f"  {step['observed_at']}  {step['from_state'] or '-':>9} -> {step['to_state']}"
                f"  (upstream: {step['upstream_state'] or '-'})"
            )
        states = [t["state"] for t in listed]
        total, verified = received.count()
        console.print(
            f"\n[bold]done[/bold]: {len(listed)} tasks: "
            + ", ".join(f"{states.count(s)} {s}" for s in ("completed", "failed", "timed_out"))
            + f"; {total} webhooks received, {verified} verified"
        )
        console.print(f"history database: {workdir / 'tracker.db'}  (logs beside it)")
        if linger > 0:
            console.print(
                f"the dashboard stays up for {linger:.0f} s at {api_url}/ui/ (Ctrl-C ends)"
            )
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(linger)
        return 0 if verified == total else 1
    finally:
        supervisor.stop()
        receiver.shutdown()


def _finished(tasks: list[dict[str, Any]], received: Received) -> bool:
    """Every task final and its terminal webhook received."""
    if not tasks:
        return False
    for task in tasks:
        if task["state"] in ("pending", "running"):
            return False
        events = [event for event, _ in received.events.get(task["task_id"], [])]
        if f"task.{task['state']}" not in events:
            return False
    return True
