"""Run the benchmark suite: upstream economy, poll throughput, webhook throughput.

    .venv/bin/python -m bench [--poll-tasks 100000] [--deliveries 10000] [--runs 3]
                              [--webhook-runs 3]
                              [--only economy|poll|webhooks|noisy|freshness|doorbell|scale]

Needs PostgreSQL (TRACKER_BENCH_POSTGRES_URL, default the tests' server); the
simulator and a webhook receiver are started on loopback. Prints one line per
figure (value, target, ratio to the baseline measured in the same run,
PASS/FAIL). A full run (no --only) replaces bench/RESULTS.md with its own record: the
latest run is kept there, earlier ones in git's history. Exit status 1 if a target fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.common import Figure, private_database, receiver_process, simulator_process
from bench.doorbell import doorbell
from bench.freshness import freshness
from bench.noisy import noisy_neighbours
from bench.polling import poll_throughput, upstream_economy
from bench.scale import memory, registration_api
from bench.webhooks import webhook_throughput

RESULTS = Path(__file__).with_name("RESULTS.md")
# The defaults' budget (20 requests/s of 50 ids) polls 10k tasks every 10 s, not every 5:
# freshness runs with a budget that covers them, so it measures the tracker, not the budget.
FRESHNESS_RPS = 50
PARTS = ["economy", "poll", "webhooks", "noisy", "freshness", "doorbell", "scale"]


def machine() -> str:
    with open("/proc/meminfo") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    return (
        f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), "
        f"{total_kb / 1024 / 1024:.1f} GiB RAM, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--economy",
        type=int,
        nargs="+",
        default=[1000, 10_000],
        help="Distinct upstream ids of each economy run.",
    )
    parser.add_argument(
        "--poll-tasks",
        type=int,
        default=100_000,
        help="Outstanding tasks of the poll throughput run (the issue's 100,000).",
    )
    parser.add_argument("--deliveries", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3, help="Poll throughput runs (median).")
    parser.add_argument(
        "--webhook-runs", type=int, default=3, help="Webhook runs (median; ~10 s each at 10k)."
    )
    parser.add_argument(
        "--fresh-tasks", type=int, default=10_000, help="Tasks of the freshness run (~100 s)."
    )
    parser.add_argument(
        "--fresh-window", type=float, default=40.0, help="Seconds over which they settle."
    )
    parser.add_argument(
        "--scale-tasks", type=int, default=100_000, help="Outstanding tasks of the memory run."
    )
    parser.add_argument(
        "--scale-cycles", type=int, default=2, help="Full poll cycles of the memory run."
    )
    parser.add_argument("--only", choices=PARTS, action="append")
    parser.add_argument(
        "--no-results", action="store_true", help="Do not replace RESULTS.md (full runs do)."
    )
    args = parser.parse_args()
    only = set(args.only or PARTS)
    # Webhook attempts log one line each at INFO: keep the output to the figures.
    logging.basicConfig(level=logging.WARNING)

    started = time.perf_counter()
    figures: list[Figure] = []
    profiles: dict[str, str] = {}

    last = [started]

    def show(new: list[Figure]) -> None:
        for figure in new:
            print(figure.line(), flush=True)
        figures.extend(new)
        now = time.perf_counter()
        print(f"({now - last[0]:.0f} s)", flush=True)  # the suite's time budget, part by part
        last[0] = now

    print(f"machine: {machine()}", flush=True)
    with private_database() as db_url:
        if only & {"economy", "poll", "freshness", "doorbell", "scale"}:
            with simulator_process() as sim_url:
                if "economy" in only:
                    for distinct in args.economy:
                        show(upstream_economy(db_url, sim_url, distinct, rate_limit=None))
                        show(upstream_economy(db_url, sim_url, distinct, rate_limit=20))
                if "poll" in only:
                    new, profiles["poll throughput"] = poll_throughput(
                        db_url, sim_url, args.poll_tasks, runs=args.runs
                    )
                    show(new)
                if "freshness" in only:
                    new, profiles["tracker worker while 10k tasks settle"] = freshness(
                        db_url,
                        sim_url,
                        tasks=args.fresh_tasks,
                        window=args.fresh_window,
                        upstream_rps=FRESHNESS_RPS,
                    )
                    show(new)
                if "doorbell" in only:
                    show(doorbell(db_url, sim_url, tasks=args.fresh_tasks))
                if "scale" in only:
                    show(memory(db_url, sim_url, tasks=args.scale_tasks, cycles=args.scale_cycles))
                    new, profiles["tracker api under 200 registrations/s"] = registration_api(
                        db_url
                    )
                    show(new)
        if "webhooks" in only:
            with receiver_process() as hook:
                new, profiles["deliver jobs one after another (job thread)"] = webhook_throughput(
                    db_url, hook, args.deliveries, runs=args.webhook_runs
                )
                show(new)
        if "noisy" in only:
            show(noisy_neighbours(db_url))
    elapsed = time.perf_counter() - started
    failed = [f.name for f in figures if f.passed is False]
    print(f"suite: {elapsed:.0f} s, {len(failed)} target(s) failed", flush=True)
    for name, profile in profiles.items():
        print(f"Profile of {name}:\n{profile}")
    if not args.no_results and only == set(PARTS):
        write_results(figures, profiles, elapsed)
    return 1 if failed else 0


def write_results(figures: list[Figure], profiles: dict[str, str], elapsed: float) -> None:
    """Replace bench/RESULTS.md with this run: command, date, commit, machine, figures."""
    command = "python -m bench " + " ".join(sys.argv[1:])
    lines = [
        "# Benchmark results",
        "",
        "The latest full run of `make bench`; earlier runs are in git's history of this file.",
        "docs/benchmarks.md says what each figure measures and why its target is what it is.",
        "",
        f"## Run of {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{command.strip()}` ({elapsed:.0f} s)",
        f"- commit: {commit()}",
        f"- machine: {machine()}",
        "",
        "```",
        *(figure.line() for figure in figures),
        "```",
        "",
    ]
    for name, profile in profiles.items():
        lines += [f"Profile of {name}:", "", "```", profile.strip(), "```", ""]
    RESULTS.write_text("\n".join(lines) + "\n")


def commit() -> str:
    """The checked-out commit, with `+changes` if the tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" +changes" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
