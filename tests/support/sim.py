"""A handle on the simulator the `simulator` fixture serves on loopback, for tests.

    def test_something(simulator: SimulatorHandle) -> None:
        simulator.configure(error_500_share=0.3, batch_cap=10)   # any SimulatorConfig knob
        ids = simulator.seed([{"outcome": "completed", "duration": 0}] * 5)
        client = UpstreamClient(simulator.url, "any-token")
        ...
        simulator.finish(ids[0], "failed")                        # settle one now
        assert simulator.stats()["retrieve_batch_calls"] == 1

Every test starts from a reset simulator: no tasks, zeroed counters, default knobs
(any token accepted, tasks settle after 5-20 s, 10 % fail, no injected faults).
"""

from __future__ import annotations

from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry


class SimulatorHandle:
    """The simulator's base URL and its admin routes (`/_sim/...`) as methods."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._http = requests.Session()
        # A kept-alive connection the server has just closed is reset on reuse: the
        # idempotent admin calls (GET, PUT) are sent again; POSTs are not.
        self._http.mount("http://", HTTPAdapter(max_retries=Retry(total=3, backoff_factor=0.1)))

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Change knobs (fields of `SimulatorConfig`); the knobs in force."""
        return self._call("PUT", "/_sim/config", knobs)

    def seed(self, tasks: list[dict[str, Any]]) -> list[str]:
        """Create tasks: each a dict of optional `id`, `service` (default luma), `outcome`
        (completed, failed, stall), `duration` (seconds to settle, 0: settled), `prompt` and
        `age` (seconds since creation, e.g. 10: already processing); omitted fields are drawn
        as for generated tasks. Their ids, in order."""
        ids: list[str] = self._call("POST", "/_sim/tasks", {"tasks": tasks})["ids"]
        return ids

    def generate(self, service: str = "luma", prompt: str = "A fox in the snow") -> str:
        """Create a task as a client would (`POST /{service}/videos`); its id."""
        answer = self._call("POST", f"/{service}/videos", {"action": "generate", "prompt": prompt})
        task_id: str = answer["task_id"]
        return task_id

    def finish(self, task_id: str, outcome: str = "completed") -> dict[str, Any]:
        """Settle a task now as `completed` or `failed`; the simulator's view of it."""
        return self._call("POST", f"/_sim/tasks/{task_id}/finish", {"outcome": outcome})

    def task(self, task_id: str) -> dict[str, Any]:
        """The simulator's view of a task: phase, `settled_at` (when it settled) and record."""
        return self._call("GET", f"/_sim/tasks/{task_id}")

    def stats(self) -> dict[str, Any]:
        """Counters: requests by action and status, retrieve_batch calls, items, tasks."""
        return self._call("GET", "/_sim/stats")

    def reset(self) -> None:
        """Forget tasks and counters, restore default knobs."""
        self._call("POST", "/_sim/reset")

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        response = self._http.request(method, self.url + path, json=body, timeout=60)
        if response.status_code >= 400:
            raise AssertionError(
                f"{method} {path} answered {response.status_code}: {response.text}"
            )
        answer: dict[str, Any] = response.json()
        return answer
