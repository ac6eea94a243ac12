"""The service's exceptions, one hierarchy:

    TrackerError
    ├── NotFound
    │   ├── ClientNotFound, TaskNotFound, DeliveryNotFound
    ├── Conflict
    │   ├── ClientExists, RegistrationConflict
    └── UpstreamError                      (tracker.upstream)
        ├── UpstreamAuthError              401/403: the token was rejected
        ├── UpstreamRateLimited            429, with `retry_after`
        ├── UpstreamServerError            5xx, timeouts, connection errors
        └── UpstreamBadAnswer              a 2xx that is not the documented shape,
                                           or another 4xx

Each carries a `code` (snake_case, shown to API users) and a message that says
what is wrong and how to fix it.
"""

from __future__ import annotations


class TrackerError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFound(TrackerError):
    code = "not_found"


class ClientNotFound(NotFound):
    code = "client_not_found"


class TaskNotFound(NotFound):
    code = "task_not_found"


class DeliveryNotFound(NotFound):
    code = "delivery_not_found"


class Conflict(TrackerError):
    code = "conflict"


class ClientExists(Conflict):
    code = "client_exists"


class RegistrationConflict(Conflict):
    code = "registration_conflict"


class UpstreamError(TrackerError):
    """The upstream could not answer as documented. `status` is the HTTP status, if any."""

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        trace_id: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.trace_id = trace_id


class UpstreamAuthError(UpstreamError):
    code = "invalid_token"


class UpstreamRateLimited(UpstreamError):
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class UpstreamServerError(UpstreamError):
    code = "api_error"


class UpstreamBadAnswer(UpstreamError):
    code = "bad_answer"
