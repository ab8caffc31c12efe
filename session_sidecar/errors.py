"""The few refusals the service makes. Each maps to one status in `routes.py`."""

from __future__ import annotations


class ApiError(Exception):
    """A refusal with a status code and a one-line reason sent to the caller."""

    status_code = 500
    message = "Internal error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = headers or {}


class BadRequest(ApiError):
    status_code = 400
    message = "Malformed conversation id"


class Unauthorized(ApiError):
    """401. `reason` is a short category for logs and metrics (never the token)."""

    status_code = 401
    message = "Authentication required"

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: str = "invalid_token",
        token_sent: bool = True,
    ):
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

    def __init__(self, message: str | None = None, *, retry_after_s: int = 1, reason: str = "redis"):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.reason = reason


class ConfigError(Exception):
    """A setting is missing or wrong: the process refuses to start, with this one-line reason."""
