"""The simulator's `callback_url`, as AceData does it: one unsigned POST of the result when
a task ends, no retries.

A generation request carrying `callback_url` gets, when its task settles, a POST of
`{"success": true, "task_id", "trace_id", ...the result}` or `{"success": false,
"task_id", "trace_id", "error": {"code", "message"}}`, with no signature header. A
failed or refused POST is counted and forgotten. The knob `callback_drop_share`
loses a share of them on purpose (a callback that never comes).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

log = logging.getLogger("tracker.simulator")

CALLBACK_TIMEOUT = 5.0
CALLBACK_THREADS = 16


class CallbackSender:
    """Sends each task's callback when it settles: a timer thread and a pool of senders.

    `due(task_id)` answers (when it settles, its body) as the task is then, or None
    (no callback, or never settles), so a task settled early by hand calls back at once.
    """

    def __init__(
        self,
        due: Callable[[str], tuple[float, dict[str, Any], str] | None],
        count: Callable[[str], None],
    ) -> None:
        self._due = due
        self._count = count
        self._queue: list[tuple[float, int, str, int]] = []  # (when, seq, task id, epoch)
        self._seq = 0
        self._epoch = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._http = requests.Session()

    def schedule(self, task_id: str, when: float) -> None:
        """Look at `task_id` again at `when` (time.time()), and call back if it settled."""
        with self._changed:
            self._seq += 1
            heapq.heappush(self._queue, (when, self._seq, task_id, self._epoch))
            if self._thread is None or not self._thread.is_alive():
                self._pool = ThreadPoolExecutor(CALLBACK_THREADS, thread_name_prefix="sim-cb")
                self._thread = threading.Thread(
                    target=self._run, name="simulator-callbacks", daemon=True
                )
                self._thread.start()
            self._changed.notify()

    def forget(self) -> None:
        """Drop every callback not sent yet (a reset)."""
        with self._changed:
            self._epoch += 1
            self._queue.clear()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue:
                    self._changed.wait()
                when, _, task_id, epoch = self._queue[0]
                wait = when - time.time()
                if wait > 0:
                    self._changed.wait(timeout=wait)
                    continue
                heapq.heappop(self._queue)
                if epoch != self._epoch:
                    continue
            try:
                due = self._due(task_id)
            except Exception:  # never let the timer die
                log.exception("simulator callback of %s", task_id)
                continue
            if due is None:
                continue
            settles_at, body, url = due
            if settles_at > time.time() + 0.001:  # its duration changed: look again then
                self.schedule(task_id, settles_at)
                continue
            assert self._pool is not None
            self._pool.submit(self._post, url, body)

    def _post(self, url: str, body: dict[str, Any]) -> None:
        try:
            response = self._http.post(
                url, json=body, timeout=CALLBACK_TIMEOUT, allow_redirects=False
            )
            response.close()
        except requests.RequestException:
            self._count("callbacks_failed")
            return
        self._count("callbacks_sent" if response.status_code < 300 else "callbacks_failed")
