"""Running the service's roles: worker, beat, and all of them at once for `tracker up`."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracker.worker.app import DELIVERY_QUEUE, POLL_QUEUE, SCHEDULE_QUEUE

log = logging.getLogger("tracker.roles")

ALL_QUEUES = (SCHEDULE_QUEUE, POLL_QUEUE, DELIVERY_QUEUE)
# Worker threads: jobs wait on the network (upstream, receivers), rarely on the CPU.
DEFAULT_CONCURRENCY = 16
# Pause before a worker that ended on an error starts afresh.
RESTART_PAUSE = 2.0


def run_worker(
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    pool: str = "threads",
    queues: Sequence[str] = ALL_QUEUES,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> None:
    """Run a Celery worker in this process until it is stopped (SIGTERM, SIGINT).

    A worker that ends without being asked to starts afresh in the same process
    (exec): Celery gives up with "Unrecoverable error" when the broker drops the
    connection again while the worker is reconnecting (Redis restarted or down a
    while; kombu's Redis transport then fails to close its channel). The broker
    is only a doorbell, so its hiccups must not end the role; leases and the
    sweep take care of the jobs the old worker held.
    """
    from celery.signals import worker_init, worker_shutting_down

    from tracker.worker.app import celery_app

    stop_requested = threading.Event()
    worker_shutting_down.connect(lambda **_: stop_requested.set(), weak=False)
    controllers: list[Any] = []  # the WorkController, which keeps the exit code
    worker_init.connect(lambda sender, **_: controllers.append(sender), weak=False)

    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)
    exit_code = controllers[-1].exitcode if controllers else None
    if exit_code and not stop_requested.is_set():
        log.error(
            "the worker ended on an error (exit code %s) without being asked to stop; "
            "starting afresh in %.0f s",
            exit_code,
            RESTART_PAUSE,
        )
        time.sleep(RESTART_PAUSE)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def run_beat(*, loglevel: str = "INFO", schedule_file: Path | None = None) -> None:
    """Run Celery beat in this process until it is stopped."""
    from tracker.worker.app import celery_app

    schedule = schedule_file or Path(tempfile.gettempdir()) / f"tracker-beat-{os.getpid()}"
    celery_app.start(["beat", f"--loglevel={loglevel}", f"--schedule={schedule}"])


# Signals that stop a supervisor and every child it started: a service manager's or
# `timeout`'s SIGTERM, a closed terminal's SIGHUP, and Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


@dataclass
class Supervisor:
    """Child processes started together and stopped together.

    Each child runs in a process group of its own, so that stopping it reaches whatever
    it starts in turn (`tracker api --workers N`), and so that a signal meant for the
    supervisor (Ctrl-C in a terminal) reaches the children only through it, in order.
    After `handle_signals()`, SIGTERM and SIGHUP stop the supervisor as Ctrl-C does (a
    KeyboardInterrupt in the main thread), so that one signal to the parent, from a
    service manager or `timeout`, runs `stop()` and ends the whole tree.
    """

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    log_dir: Path | None = None  # None: children write to this terminal
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _handlers: dict[int, Any] = field(default_factory=dict, repr=False)

    def handle_signals(self) -> None:
        """Make SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does, until `stop()`.

        Only the main thread can set signal handlers; elsewhere this does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._handlers.setdefault(sig, signal.signal(sig, signal.default_int_handler))

    def start(self, name: str, args: Sequence[str]) -> None:
        """Start `tracker ARGS` as child `name` (its output to log_dir/NAME.log, if set)."""
        output = (self.log_dir / f"{name}.log").open("ab") if self.log_dir else None
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "tracker", *args],
            env=dict(self.env),
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            process_group=0,
        )

    def first_exit(self) -> str | None:
        """The name of a child that has exited, if any."""
        return next((n for n, p in self.children.items() if p.poll() is not None), None)

    def wait(self) -> str:
        """Block until a child exits (or Ctrl-C, SIGTERM, SIGHUP); returns its name."""
        while (name := self.first_exit()) is None:
            time.sleep(0.5)
        return name

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child's process group, then SIGKILL those still running after
        `timeout`, and whatever a child left behind in its group. A second signal
        meanwhile does not cut the stop short."""
        in_main_thread = threading.current_thread() is threading.main_thread()
        before = (
            {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
            if (in_main_thread)
            else {}
        )
        try:
            for process in self.children.values():
                _signal_group(process, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for process in self.children.values():
                if not _exited(process, max(0.1, deadline - time.monotonic())):
                    log.warning(
                        "child %d did not stop within %.0f s; killing it", process.pid, timeout
                    )
                _signal_group(process, signal.SIGKILL)
                process.wait()
        finally:
            for sig, handler in before.items():
                signal.signal(sig, self._handlers.pop(sig, handler))


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Send `sig` to the child's process group, while the child (its leader) is not reaped:
    until then its id cannot name another process group."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(process.pid, sig)


def _exited(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the child exits within `timeout` seconds; it is left unreaped (`_signal_group`)."""
    deadline = time.monotonic() + timeout
    while process.returncode is None:
        try:
            if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return True
        except ChildProcessError:  # reaped elsewhere
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
