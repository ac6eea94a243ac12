"""The dashboard's overview: tasks by state and service, deliveries by status,
destinations open or disabled, and the upstream request budget with its 429s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from tracker.api.ui.auth import signed_in
from tracker.api.ui.common import context, operations
from tracker.api.ui.deliveries import STATUS_ORDER
from tracker.api.ui.render import page
from tracker.api.ui.tasks import STATE_ORDER
from tracker.clock import utcnow
from tracker.config import Settings
from tracker.db.queries import delivery_counts, task_counts
from tracker.observability.metrics import upstream_requests_by_outcome
from tracker.upstream.budget import credential_key, read_budget_state

router = APIRouter(prefix="/ui", include_in_schema=False)

RATE_LIMITED = "too_many_requests"


@router.get("")
def bare() -> Response:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/")
def overview_page(request: Request) -> Response:
    """What is in flight, what failed, which destinations are down, and the upstream."""
    settings: Settings = request.app.state.settings
    with signed_in(request) as (session, client, token):
        now = utcnow()
        by_service = task_counts(session, client_id=client.id)
        by_state = {
            state: sum(c.get(state, 0) for c in by_service.values()) for state in STATE_ORDER
        }
        by_status = delivery_counts(session, client_id=client.id)
        ops = operations(request)
        destinations: list[dict[str, Any]] = (
            ops.list_destinations(session, client_id=client.id) if ops else []
        )
        redis_url = settings.broker_url
        budget = read_budget_state(
            session,
            credential_key(settings.upstream_bearer),
            rps=settings.upstream_rps,
            redis_url=redis_url if redis_url and redis_url.startswith("redis") else None,
            now=now,
        )
        requests = upstream_requests_by_outcome()
        values = context(
            request,
            client,
            token,
            title="Overview",
            nav="overview",
            states=STATE_ORDER,
            by_state=by_state,
            by_service=dict(sorted(by_service.items())),
            tasks_total=sum(by_state.values()),
            statuses=STATUS_ORDER,
            by_status={status: by_status.get(status, 0) for status in STATUS_ORDER},
            deliveries_total=sum(by_status.values()),
            destinations_down=[d for d in destinations if d.get("state") in ("open", "disabled")],
            destinations_total=len(destinations),
            budget=budget,
            requests=dict(sorted(requests.items())),
            requests_total=sum(requests.values()),
            rate_limited=requests.get(RATE_LIMITED, 0),
        )
    return page("overview.html", values)
