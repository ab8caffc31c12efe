"""Who is calling: bearer JWT verification and the backend-compatible development mode.

The only entry point is `Authenticator.authenticate(header)`, which returns an
`Identity` or raises `Unauthorized` (401) / `Unavailable` (503). Tokens are
never logged; only a reason category is.
"""

from __future__ import annotations

import hashlib
import logging

import jwt
import msgspec

from session_sidecar.errors import Unauthorized
from session_sidecar.settings import Settings

log = logging.getLogger("session_sidecar.auth")

MAX_TOKEN_BYTES = 8192


class Identity(msgspec.Struct, frozen=True):
    user_id: str
    # sha256 of the token: a cache key that is safe to keep in memory.
    token_hash: str | None = None
    # The raw header, only to forward to the backend policy. Never logged.
    authorization: str | None = msgspec.field(default=None)
    development: bool = False

    def __repr__(self) -> str:
        return f"Identity(user_id={self.user_id!r}, development={self.development})"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header; None when no header was sent."""
    if header is None or header.strip() == "":
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthorized("Malformed Authorization header", reason="malformed_header")
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized("Token too large", reason="oversized")
    return token


class Authenticator:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._user_claims = settings.user_claims

    async def start(self) -> None:
        if self._settings.development_mode:
            log.warning(
                "DEVELOPMENT MODE: requests without a token act as user %r",
                self._settings.default_username,
            )

    async def close(self) -> None:
        return None

    async def authenticate(self, header: str | None) -> Identity:
        token = bearer_token(header)
        settings = self._settings
        if token is None:
            if settings.development_mode and settings.default_username:
                return Identity(user_id=settings.default_username, development=True)
            raise Unauthorized("Missing bearer token", reason="missing", token_sent=False)
        if not settings.jwt_secret:
            raise Unauthorized("Token cannot be verified", reason="no_verifier")
        try:
            claims = jwt.decode(
                token,
                settings.jwt_secret,
                algorithms=["HS256"],
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                leeway=settings.jwt_leeway_s,
                options={
                    "require": ["exp"],
                    "verify_aud": settings.jwt_audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Token expired", reason="expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("Invalid token", reason=_reason(exc)) from None
        return Identity(
            user_id=self._user_id(claims), token_hash=token_hash(token), authorization=header
        )

    def _user_id(self, claims: dict[str, object]) -> str:
        for claim in self._user_claims:
            value = claims.get(claim)
            if isinstance(value, str) and value:
                return value
        raise Unauthorized("Token names no user", reason="no_user")


def _reason(exc: jwt.InvalidTokenError) -> str:
    reasons: list[tuple[type[jwt.InvalidTokenError], str]] = [
        (jwt.InvalidSignatureError, "bad_signature"),
        (jwt.InvalidAudienceError, "wrong_audience"),
        (jwt.InvalidIssuerError, "wrong_issuer"),
        (jwt.ImmatureSignatureError, "not_yet_valid"),
        (jwt.MissingRequiredClaimError, "missing_claim"),
        (jwt.InvalidAlgorithmError, "bad_algorithm"),
        (jwt.DecodeError, "malformed"),
    ]
    for kind, reason in reasons:
        if isinstance(exc, kind):
            return reason
    return "invalid"
