"""What every dashboard page shares: its context, notices after a form, error pages."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import RedirectResponse, Response

from tracker.api.ui.operations import DestinationOperations
from tracker.api.ui.render import page
from tracker.api.ui.sessions import csrf_token
from tracker.db.models import Client

# Messages shown after a form, by code: the URL names a code, never the text, so a link
# cannot make the dashboard say something it did not.
NOTICES = {
    "retried": "Due again now: the next sweep sends it, with the same webhook-id.",
    "replayed": "Replay accepted: the matching deliveries are due again now.",
    "resumed": "Destination resumed: the deliveries it held are released.",
}
ERRORS = {
    "delivery_superseded": (
        "That delivery was superseded by a newer event of its task and is not sent any "
        "more; retry the newer delivery instead."
    ),
    "delivery_outdated": (
        "That delivery is older than another delivery of its task: resending it would give "
        "the receiver an older event after a newer one. Retry the newest one instead."
    ),
    "conflict": "That cannot be done in the resource's current state.",
    "not_available": "This tracker does not track destinations yet.",
}

_COUNT = re.compile(r"^[0-9]{1,9}$")


def operations(request: Request) -> DestinationOperations | None:
    """The delivery engine's destination operations, when this tracker has them."""
    ops: DestinationOperations | None = getattr(request.app.state, "destination_operations", None)
    return ops


def context(
    request: Request, client: Client, token: str, *, title: str, nav: str, **values: Any
) -> dict[str, Any]:
    """The template context of a signed-in page: who, the CSRF token, the notice to show."""
    notice = NOTICES.get(request.query_params.get("notice", ""))
    count = request.query_params.get("count", "")
    if notice and _COUNT.match(count):
        notice = f"{notice} ({int(count)})"
    return {
        "title": title,
        "nav": nav,
        "client": client,
        "csrf": csrf_token(token),
        "notice": notice,
        "error": ERRORS.get(request.query_params.get("error", "")),
        "has_destinations": operations(request) is not None,
        **values,
    }


def not_found(request: Request, client: Client, token: str, message: str) -> Response:
    """The dashboard's 404 page, saying what was not found."""
    values = context(request, client, token, title="Not found", nav="")
    return page("not_found.html", {**values, "message": message}, status_code=404)


def back_to(target: str, **params: str | int) -> RedirectResponse:
    """303 to `target` (a dashboard path) with a notice or error code for the next page."""
    base, _, query = target.partition("?")
    kept = [
        part
        for part in query.split("&")
        if part and not part.startswith(("notice=", "error=", "count="))
    ]
    extra = urlencode({key: str(value) for key, value in params.items()})
    joined = "&".join([*kept, extra] if extra else kept)
    return RedirectResponse(f"{base}?{joined}" if joined else base, status_code=303)
