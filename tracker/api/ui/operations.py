"""The dashboard's seam to destination operations: list, resume, bulk replay.

Destinations (a callback URL's scheme, host and port, with a circuit breaker) and bulk
replay belong to the delivery engine (`GET /v1/destinations`,
`POST /v1/destinations/{id}/resume`, `POST /v1/deliveries/replay`). The dashboard calls
them through this small interface, set on the app as `app.state.destination_operations`
by `tracker.api.ui.install`: the same functions the API routes call, each over the
request's session, never committing. Until the engine provides them the attribute is
None and the pages say that this tracker does not track destinations.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session

DESTINATION_STATES = ("healthy", "open", "disabled")


class DestinationOperations(Protocol):
    """What the dashboard needs of the delivery engine's destinations and replay.

    Destinations are dicts shaped like the items of `GET /v1/destinations`: `id`,
    `scheme`, `host`, `port`, `state` (`healthy`, `open`, `disabled`),
    `consecutive_failures`, `last_success_at` (ISO 8601 or None), `held_deliveries`.
    Errors are the tracker's own (`NotFound`, `Conflict`, `InvalidQuery`): the dashboard
    shows their messages.
    """

    def list_destinations(self, session: Session, *, client_id: int) -> list[dict[str, Any]]:
        """The client's destinations."""

    def resume_destination(
        self, session: Session, destination_id: str, *, client_id: int, now: datetime
    ) -> dict[str, Any]:
        """Close an open or disabled destination now and release what it holds."""

    def replay_deliveries(
        self,
        session: Session,
        *,
        client_id: int,
        since: datetime,
        until: datetime | None,
        status: str | None,
        event: str | None,
        service: str | None,
        task_id: str | None,
        now: datetime,
    ) -> int:
        """Deliver again every matching delivery (`since`/`until` bound `created_at`);
        how many."""
