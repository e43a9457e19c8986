"""One exception tree for mint.

Every error a user can cause has a stable code; the API maps codes to HTTP status through
`HTTP_STATUS_BY_CODE`, so the wire behaviour and the documentation come from one table.
Messages follow one template: what was wrong, the rule, and how to fix it.
"""

from __future__ import annotations


class MintError(Exception):
    """Base of every error mint raises on purpose."""

    code = "internal"
    #: "user" errors are the caller's to fix; "server" errors are ours.
    category = "server"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserError(MintError, ValueError):
    code = "invalid_request"
    category = "user"


class NotFound(UserError, LookupError):
    code = "not_found"


class UnknownBase(NotFound):
    code = "unknown_base"


class AuthenticationFailed(UserError):
    code = "unauthenticated"


class PermissionDenied(UserError):
    code = "permission_denied"


class MissingScope(PermissionDenied):
    """The API key is valid but not allowed this kind of call."""

    code = "missing_scope"


class MalformedRequest(UserError):
    code = "malformed_request"


class Unsupported(UserError):
    """A Tinker call mint does not implement; the message says why and what to use instead."""

    code = "unsupported"


class UnsupportedLoss(UserError):
    code = "unsupported_loss"


class InvalidAdapter(UserError):
    """An adapter that cannot be admitted; the message lists every problem found."""

    code = "invalid_adapter"

    def __init__(self, problems: list[str], subject: str = "adapter") -> None:
        self.problems = list(problems)
        listing = "; ".join(self.problems)
        super().__init__(f"{subject} rejected ({len(self.problems)} problem(s)): {listing}")


class Conflict(UserError):
    code = "conflict"


class AliasInUse(Conflict):
    code = "alias_in_use"


class Busy(MintError):
    """Retryable back-pressure: the caller should retry after `retry_after_s`."""

    code = "busy"
    category = "server"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobQuotaExceeded(Busy):
    """The tenant already has its quota of unfinished jobs; nothing was queued."""

    code = "job_quota_exceeded"


class RequestLost(MintError):
    """A job's result is gone (the server restarted); the SDK resubmits samples on this."""

    code = "request_lost"
    category = "server"


class NonFiniteLogits(UserError):
    """A request's adapter drove the model's logits to NaN or infinity; only its rows fail."""

    code = "non_finite_logits"


class Cancelled(UserError):
    """A request its caller gave up on (a stream whose client disconnected)."""

    code = "cancelled"


class JobFailed(MintError, RuntimeError):
    code = "job_failed"


HTTP_STATUS_BY_CODE: dict[str, int] = {
    "invalid_request": 400,
    "unsupported": 400,
    "malformed_request": 400,
    "unsupported_loss": 400,
    "invalid_adapter": 400,
    "non_finite_logits": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "missing_scope": 403,
    "not_found": 404,
    "unknown_base": 404,
    "conflict": 409,
    "alias_in_use": 409,
    "busy": 429,
    "job_quota_exceeded": 429,
    "request_lost": 410,
    # The status servers log for a client that closed its request; nobody is left to read it.
    "cancelled": 499,
    "job_failed": 500,
    "internal": 500,
}


def http_status_for(error: MintError) -> int:
    return HTTP_STATUS_BY_CODE.get(error.code, 500)
