"""Rendering the dashboard: the Jinja2 environment, its filters, and the security headers.

Autoescaping is on for every template: whatever a client or the upstream supplied
(metadata, ids, records, receivers' answers) reaches the page as text. Pages load no
inline script or style, so the Content-Security-Policy allows scripts, styles and
connections from this origin only. Output previews are the one exception: a task's
images, videos and audio live on the upstream's file host, so `img-src` and `media-src`
also allow `https:` (media cannot run script).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined

from tracker import __version__

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data: https:; media-src 'self' https:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _when(value: str | None) -> str:
    """An ISO 8601 time as `2026-12-01 10:00:05 UTC`; `-` for none."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _http_url(value: Any) -> str:
    """`value` if it is an http(s) URL, else empty: an upstream's `javascript:` or `data:`
    URL never becomes a link or a source."""
    text = str(value or "")
    return text if text.lower().startswith(("https://", "http://")) else ""


def _percent(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0


environment = Environment(
    loader=PackageLoader("tracker.api.ui", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters["pretty_json"] = _pretty_json
environment.filters["when"] = _when
environment.filters["http_url"] = _http_url
environment.globals["percent"] = _percent
environment.globals["version"] = __version__


def page(
    template: str,
    context: Mapping[str, Any],
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """A rendered page with the dashboard's security headers."""
    html = environment.get_template(template).render(**context)
    return HTMLResponse(
        html, status_code=status_code, headers={**SECURITY_HEADERS, **(headers or {})}
    )
