"""The HTTP API: one router per resource, the auth dependency, errors, middleware.

Served by `tracker api` (docs/api.md). May import worker, polling, delivery and
everything below them; never devtools.
"""

from tracker.api.app import create_app

__all__ = ["create_app"]
