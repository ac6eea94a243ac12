"""The service's exceptions, one hierarchy:

    TrackerError
    ├── ConfigError                        a setting the service cannot run with
    │   └── TokenUnavailable               a client's stored upstream token cannot be
    │                                      decrypted (TRACKER_SECRET_KEY unset or wrong)
    ├── NotFound                           404
    │   ├── ClientNotFound, TaskNotFound, DeliveryNotFound, DestinationNotFound
    ├── Conflict                           409
    │   ├── ClientExists, RegistrationConflict
    ├── InvalidQuery                       422: a listing parameter
    │   └── InvalidCursor
    ├── SignInRequired                     the dashboard needs a (new) sign-in
    ├── CsrfRefused                        a dashboard form without its CSRF token
    ├── InvalidTransition                  a move the state machine forbids
    ├── SignatureError                     a webhook that does not verify
    ├── CallbackRefused                    a callback URL that cannot be sent to
    │   └── ForbiddenAddress               it resolves to a non-public address
    ├── UnresolvableHost                   DNS has no answer (retried)
    ├── BudgetUnavailable                  no upstream request slot in time
    └── UpstreamError                      the upstream did not answer as documented
        ├── UpstreamAuthError              401/403: the token was rejected
        ├── UpstreamRateLimited            429, with `retry_after`
        ├── UpstreamServerError            5xx, timeouts, connection errors
        └── UpstreamBadAnswer              a 2xx that is not the documented shape,
                                           or another 4xx

Each carries a `code` (snake_case, shown to API users) and a message that says
what is wrong and how to fix it. The API maps them to statuses in
`tracker.api.errors`.
"""

from __future__ import annotations

from datetime import datetime


class TrackerError(Exception):
    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(TrackerError):
    """A setting has a value the service cannot run with."""

    code = "invalid_configuration"


class NotFound(TrackerError):
    code = "not_found"


class ClientNotFound(NotFound):
    code = "client_not_found"


class TaskNotFound(NotFound):
    code = "task_not_found"


class DeliveryNotFound(NotFound):
    code = "delivery_not_found"


class DestinationNotFound(NotFound):
    code = "destination_not_found"


class Conflict(TrackerError):
    code = "conflict"


class ClientExists(Conflict):
    code = "client_exists"


class RegistrationConflict(Conflict):
    code = "registration_conflict"


class InvalidQuery(TrackerError):
    """A listing parameter the query cannot use; the message names the parameter."""

    code = "invalid_query"


class InvalidCursor(InvalidQuery):
    code = "invalid_cursor"


class SignInRequired(TrackerError):
    """A dashboard request without a valid session: no cookie, or one that expired or
    was signed out. The dashboard answers with its sign-in page."""

    code = "sign_in_required"


class CsrfRefused(TrackerError):
    """A dashboard form that does not carry its session's CSRF token: nothing is done."""

    code = "csrf_refused"


class InvalidTransition(TrackerError):
    """A state change the state machine does not allow (terminal states are final)."""

    code = "invalid_transition"


class SignatureError(TrackerError):
    """A webhook whose headers or signature do not verify."""

    code = "invalid_signature"


class CallbackRefused(TrackerError):
    """The callback URL cannot be used at all: it is not retried."""

    code = "invalid_callback_url"


class ForbiddenAddress(CallbackRefused):
    """The callback host resolves to a non-public address."""

    code = "forbidden_address"


class UnresolvableHost(TrackerError):
    """DNS gave no address for the callback host (possibly transient: retried)."""

    code = "unresolvable_host"


class BudgetUnavailable(TrackerError):
    """No upstream request slot within the wait this caller accepts, or the token is paused."""

    code = "budget_unavailable"

    def __init__(self, message: str, *, retry_at: datetime) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class TokenUnavailable(ConfigError):
    """A client's stored upstream token cannot be used: no TRACKER_SECRET_KEY, or none of its
    keys decrypts it."""

    code = "upstream_token_unavailable"


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
