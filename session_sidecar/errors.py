"""The few refusals the service makes. Each maps to one status in `routes.py`, and to the
metric that counts it in `observability.py`."""

from __future__ import annotations

from typing import Literal

# Why a caller's credentials were refused: the `reason` of the access log and of
# `sidecar_auth_failures_total` (docs/auth.md lists them). Never anything of the token.
AuthFailure = Literal[
    "missing",
    "malformed_header",
    "malformed",
    "oversized",
    "bad_algorithm",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_issuer",
    "wrong_audience",
    "missing_claim",
    "unknown_kid",
    "missing_kid",
    "no_user",
    "invalid",
    "backend_unauthorized",
]
# The dependency that failed a request.
Upstream = Literal["redis", "jwks", "backend"]
# Why a dependency failed: Redis by how, the others by which.
Outage = Literal["redis_timeout", "redis_error", "jwks", "backend"]
_UPSTREAM: dict[Outage, Upstream] = {
    "redis_timeout": "redis",
    "redis_error": "redis",
    "jwks": "jwks",
    "backend": "backend",
}


class ApiError(Exception):
    """A refusal with a status code and a one-line reason sent to the caller."""

    status_code = 500
    message = "Internal error"
    # The access log's `reason`: a category where the refusal has one, else the message.
    reason: str

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = headers or {}
        self.reason = self.message


class BadRequest(ApiError):
    status_code = 400
    message = "Malformed conversation id"


class Unauthorized(ApiError):
    """401: the caller's credentials, refused by the service or by the backend."""

    status_code = 401
    message = "Authentication required"
    reason: AuthFailure

    def __init__(self, message: str | None = None, *, reason: AuthFailure, token_sent: bool = True):
        # RFC 6750: no error code when no credentials were sent at all.
        challenge = 'Bearer error="invalid_token"' if token_sent else 'Bearer realm="session-sidecar"'
        super().__init__(message, headers={"WWW-Authenticate": challenge})
        self.reason = reason


class Forbidden(ApiError):
    status_code = 403
    message = "Not allowed to see this conversation"


class NotFound(ApiError):
    status_code = 404
    message = "No active session found"


class Unavailable(ApiError):
    """503: a dependency (Redis, the JWKS issuer, the backend) is down or too slow."""

    status_code = 503
    message = "Session store unavailable"
    reason: Outage

    def __init__(self, message: str | None = None, *, reason: Outage, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.reason = reason

    @property
    def upstream(self) -> Upstream:
        return _UPSTREAM[self.reason]


class ConfigError(Exception):
    """A setting is missing or wrong: the process refuses to start, with this one-line reason."""
