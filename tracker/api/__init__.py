"""The HTTP API (SPEC section 3): one router per resource, served by `tracker api`."""

from tracker.api.app import create_app

__all__ = ["create_app"]
