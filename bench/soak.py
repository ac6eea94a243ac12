"""The fault soak (issue #8): every fault of the fault suite, mixed, for half an hour.

    python -m bench.soak                  # 30 minutes, 3000 tasks
    python -m bench.soak --minutes 5 --tasks 500

Runs the tracker's real processes (two workers, a beat, the API) on a private
PostgreSQL and Redis (tests/faults.py), the simulator as upstream and a
loopback receiver. Tasks are registered in waves for most of the run, half
in-process and half through the API by clients that send again what was not
answered 2xx. Two fault threads run at once, each picking its next fault from a
shuffled deck:

- infrastructure: workers SIGKILLed every 3 s for 30 s, the beat SIGKILLed,
  two beats at once, Redis restarted (empty) or down for 30 s, PostgreSQL
  restarted or down for 10 s, the API SIGKILLed;
- surroundings: the receiver down for 2 minutes then answering after 20 s
  (the webhook timeout is 10 s), the upstream answering 500s for a minute,
  429 storms with Retry-After, non-JSON, missing items, or 401 until the token
  is rotated by configuration (every process restarted with the new one).

Faults stop a few minutes before the end; the run then waits for the system to
settle and checks the invariants of tests/faults.py, printing the figures.
Exit status 0 when every invariant held.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.faults import FaultRig, Repeating
from tests.support.sim import SimulatorHandle
from tracker.devtools.simulator import serving_in_thread

# Durations as the issue states them; leases and retries at production-like scale.
SOAK_ENV = {
    "TRACKER_POLL_INTERVAL": "2",
    "TRACKER_MAX_POLL_INTERVAL": "10",
    "TRACKER_SWEEP_INTERVAL": "2",
    "TRACKER_POLL_LEASE": "15",
    "TRACKER_DELIVERY_LEASE": "30",
    "TRACKER_WEBHOOK_TIMEOUT": "10",
    # About 20 minutes of retries: longer than any outage the soak causes.
    "TRACKER_WEBHOOK_RETRY_SCHEDULE": "0,2,5,10,20,30,30,60,60,60,60,120,120,120,300,300",
    "TRACKER_UPSTREAM_TIMEOUT": "10",
}
ROTATED_TOKEN = "soak-rotated-token-0123456789"
TASK_DURATION = 120.0  # simulator tasks settle within this many seconds of creation
QUIET_END = 0.15  # share of the run, at the end, without new faults or tasks


class Soak:
    def __init__(self, rig: FaultRig, simulator: SimulatorHandle, args: argparse.Namespace):
        self.rig = rig
        self.simulator = simulator
        self.rng = random.Random(args.seed)
        self.started = time.monotonic()
        self.quiet_at = self.started + args.minutes * 60 * (1 - QUIET_END)
        self.expected: dict[str, str] = {}
        self.accepted: list[str] = []
        self.tasks = args.tasks
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def say(self, message: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        print(f"[{minutes:02d}:{seconds:02d}] {message}", flush=True)

    def quiet(self) -> bool:
        return time.monotonic() >= self.quiet_at or self.stopping.is_set()

    # Tasks.

    def feed(self) -> None:
        """Register tasks in waves until the quiet end: half in-process, half via the API."""
        waves = max(1, int((self.quiet_at - self.started) / 10))
        per_wave = max(2, self.tasks // waves)
        while len(self.expected) < self.tasks and not self.quiet():
            count = min(per_wave, self.tasks - len(self.expected))
            wave = self.rig.seed(count, spread=TASK_DURATION)
            ids = list(wave)
            with self.lock:
                self.expected.update(wave)
            half = len(ids) // 2
            try:
                self.rig.register(ids[:half])
                direct = ids[:half]
            except Exception as exc:  # the database may be down: those are simply not accepted
                self.say(f"in-process registration failed ({type(exc).__name__})")
                direct = []
            via_api = self._register_like_a_client(ids[half:])
            with self.lock:
                self.accepted += direct + via_api
            time.sleep(10)

    def _register_like_a_client(self, ids: list[str]) -> list[str]:
        done: list[str] = []
        for start in range(0, len(ids), 10):
            chunk = ids[start : start + 10]
            deadline = time.monotonic() + 60
            got: list[str] = []
            while len(got) < len(chunk) and time.monotonic() < deadline:
                got += self.rig.register_through_api([i for i in chunk if i not in got])
                if len(got) < len(chunk):
                    time.sleep(1)
            done += got
        return done

    # Faults.

    def run_faults(self, deck: list[tuple[str, Callable[[], None]]]) -> None:
        """Apply faults from a shuffled deck, one at a time, until the quiet end."""
        cards: list[tuple[str, Callable[[], None]]] = []
        while not self.quiet():
            if not cards:
                cards = deck[:]
                self.rng.shuffle(cards)
            name, fault = cards.pop()
            self.say(f"fault: {name}")
            try:
                fault()
            except Exception as exc:  # a broken fault is reported, the soak goes on
                self.say(f"fault {name} raised {exc!r}")
            self.pause(self.rng.uniform(10, 30))

    def pause(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def infrastructure_deck(self) -> list[tuple[str, Callable[[], None]]]:
        rig = self.rig

        def worker_kills() -> None:
            killer = Repeating(3, lambda: rig.kill("worker"))
            self.pause(30)
            killer.stop()

        def beat_kill() -> None:
            rig.kill("beat")

        def two_beats() -> None:
            rig.processes.beat()
            rig.fault("two beats")
            self.pause(60)
            rig.kill("beat", restart=False)

        def redis_restart() -> None:
            rig.redis.restart()
            rig.fault("redis restart")

        def redis_down() -> None:
            rig.redis.stop()
            rig.fault("redis down 30 s")
            self.pause(30)
            rig.redis.start()

        def postgres_restart() -> None:
            rig.postgres.restart("fast")
            rig.fault("postgresql restart")

        def postgres_down() -> None:
            rig.postgres.stop("immediate")
            rig.fault("postgresql down 10 s")
            self.pause(10)
            rig.postgres.start()

        def api_kill() -> None:
            rig.kill("api")

        return [
            ("workers SIGKILLed every 3 s for 30 s", worker_kills),
            ("beat SIGKILLed", beat_kill),
            ("two beats for 60 s", two_beats),
            ("redis restarted empty", redis_restart),
            ("redis down 30 s", redis_down),
            ("postgresql restarted", postgres_restart),
            ("postgresql down 10 s", postgres_down),
            ("API SIGKILLed", api_kill),
        ]

    def surroundings_deck(self) -> list[tuple[str, Callable[[], None]]]:
        rig, simulator = self.rig, self.simulator
        clear = {
            "error_500_share": 0.0,
            "error_429_share": 0.0,
            "malformed_share": 0.0,
            "drop_share": 0.0,
        }

        def receiver_down_then_slow() -> None:
            rig.receiver.down()
            rig.fault("receiver down 2 min")
            self.pause(120)
            rig.receiver.up(delay=20)
            rig.fault("receiver answering after 20 s")
            self.pause(60)
            rig.receiver.up(delay=0.05)

        def upstream(name: str, seconds: float, **knobs: object) -> Callable[[], None]:
            def phase() -> None:
                simulator.configure(**{**clear, **knobs})
                rig.fault(name)
                self.pause(seconds)
                simulator.configure(**clear)

            return phase

        def token_revoked() -> None:
            token = ROTATED_TOKEN + str(rig.faults["upstream 401, token rotated"])
            simulator.configure(tokens=[token])
            rig.fault("upstream 401, token rotated")
            self.pause(20)
            rig.restart_all(TRACKER_UPSTREAM_TOKEN=token)

        return [
            ("receiver down 2 min, then slow 1 min", receiver_down_then_slow),
            ("upstream 500s for 60 s", upstream("upstream 500s 60 s", 60, error_500_share=1.0)),
            (
                "upstream 429 storm with Retry-After",
                upstream("upstream 429 storm 30 s", 30, error_429_share=0.8, retry_after=3),
            ),
            ("upstream non-JSON", upstream("upstream non-JSON 30 s", 30, malformed_share=0.5)),
            ("upstream missing items", upstream("upstream missing items 30 s", 30, drop_share=0.4)),
            ("upstream 401 until the token is rotated", token_revoked),
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run")
    parser.add_argument("--tasks", type=int, default=3000, help="tasks registered in all")
    parser.add_argument("--seed", type=int, default=8, help="seed of the fault schedule")
    parser.add_argument("--keep", action="store_true", help="keep the logs' folder")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="tracker-soak-"))
    passed = False
    with serving_in_thread() as url:
        simulator = SimulatorHandle(url)
        rig = FaultRig(workdir, simulator, env=SOAK_ENV, receiver_delay=0.05)
        soak = Soak(rig, simulator, args)
        soak.say(f"{args.minutes:g} minutes, {args.tasks} tasks; logs in {workdir}")
        try:
            rig.start(workers=2, beats=1, api=True)
            threads = [
                threading.Thread(target=soak.feed, daemon=True),
                threading.Thread(
                    target=soak.run_faults, args=(soak.infrastructure_deck(),), daemon=True
                ),
                threading.Thread(
                    target=soak.run_faults, args=(soak.surroundings_deck(),), daemon=True
                ),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            soak.say("quiet: no more faults or tasks; waiting for the system to settle")
            remaining = soak.started + args.minutes * 60 - time.monotonic()
            settle_started = time.monotonic()
            try:
                figures = rig.settle_and_check(
                    soak.expected, accepted=soak.accepted, timeout=max(remaining, 300)
                )
            except AssertionError as exc:
                soak.say(f"gave up after {time.monotonic() - settle_started:.0f} s")
                print(str(exc)[:20000])
                return 1
            soak.say(f"settled after {time.monotonic() - settle_started:.0f} s")
            print(figures.summary())
            print(f"tasks accepted        {len(soak.accepted)} of {len(soak.expected)} sent")
            print("timeline:\n" + rig.timeline(figures))
            passed = True
            return 0
        except KeyboardInterrupt:
            soak.stopping.set()
            return 130
        finally:
            rig.close()
            if passed and not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
