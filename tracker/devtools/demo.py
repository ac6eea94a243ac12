"""`tracker demo`: the whole loop on one machine, with live progress.

Starts the simulator (as the upstream), the tracker's API, worker and beat on
the embedded defaults (SQLite, embedded broker) and a small webhook receiver
that verifies every signature; creates a demo client, seeds a handful of video
tasks (some fail, one stalls past its deadline), registers them through the
API, and shows states and webhooks as they arrive until every task is final.
"""

from __future__ import annotations

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
    for column in ("task", "prompt", "state", "upstream", "polls", "webhooks"):
        table.add_column(column)
    colours = {"completed": "green", "failed": "red", "timed_out": "yellow", "running": "cyan"}
    for task in tasks:
        events = received.events.get(task["task_id"], [])
        hooks = ", ".join(f"{event}{'' if ok else ' (BAD SIGNATURE)'}" for event, ok in events)
        colour = colours.get(task["state"], "white")
        table.add_row(
            task["task_id"][:8],
            prompts.get(task["task_id"], "")[:34],
            f"[{colour}]{task['state']}[/{colour}]",
            task.get("upstream_state") or "-",
            str(task["polls"]),
            hooks or "-",
        )
    total, verified = received.count()
    table.caption = f"webhooks received: {total}, verified: {verified}"
    return table


def run_demo(
    console: Console,
    *,
    tasks: int = 6,
    max_duration: float = 12.0,
    stall_timeout: int = 20,
    timeout: float = 180.0,
    workdir: Path | None = None,
) -> int:
    """Run the demo; returns the exit code (0: every task final, every webhook verified)."""
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

        outcomes = ["completed", "failed"] * tasks
        plan = [
            {
                "service": "luma",
                "outcome": outcome,
                "duration": 3 + max_duration * n / tasks,
                "prompt": PROMPTS[n % len(PROMPTS)],
            }
            for n, outcome in enumerate(outcomes[: tasks - 1])
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
        registrations = [
            {
                "task_id": task_id,
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

        shown = next(t for t in listed if t["state"] == "completed")
        detail = requests.get(
            f"{api_url}/v1/tasks/{shown['task_id']}", headers=auth, timeout=10
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
