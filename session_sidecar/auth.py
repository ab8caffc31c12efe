"""Who is calling: bearer JWT verification and the backend-compatible development mode.

The only entry point is `Authenticator.authenticate(header)`, which returns an
`Identity` or raises `Unauthorized` (401) / `Unavailable` (503). Tokens are
never logged; only a reason category is.

Verification keys, any combination of: a JWKS URL (RS256/ES256), a static PEM
public key (RS256 or ES256, fixed by the key's type) and an HS256 secret. The
algorithm a token may use is decided by the key that verifies it, never by the
token's header alone, so an HS256 token "signed" with a public key as the
secret finds no HMAC key to verify against.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options

from session_sidecar.errors import AuthFailure, ConfigError, Unauthorized, Unavailable
from session_sidecar.jwks import JwksCache, UnknownKey
from session_sidecar.settings import Settings
from session_sidecar.ttlcache import TTLCache

log = logging.getLogger("session_sidecar.auth")

MAX_TOKEN_BYTES = 8192
SUPPORTED_ALGORITHMS = frozenset({"RS256", "ES256", "HS256"})
# Below this an HS256 secret is guessable offline from a single token (RFC 7518 3.2).
MIN_SECRET_BYTES = 32

VerificationKey = jwt.PyJWK | rsa.RSAPublicKey | ec.EllipticCurvePublicKey | str


class Identity(msgspec.Struct, frozen=True):
    user_id: str
    # sha256 of the token: a cache key that is safe to keep in memory.
    token_hash: str | None = None
    # The raw header, only to forward to the backend policy. Never logged. None: development
    # mode's default user, who sent no token.
    authorization: str | None = msgspec.field(default=None)

    def __repr__(self) -> str:
        return f"Identity(user_id={self.user_id!r})"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header; None when no header was sent."""
    if header is None or header.strip() == "":
        return None
    if len(header) > MAX_TOKEN_BYTES + 16:
        raise Unauthorized("Token too large", reason="oversized")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthorized("Malformed Authorization header", reason="malformed_header")
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthorized("Token too large", reason="oversized")
    return token


def load_public_key(path: str) -> tuple[rsa.RSAPublicKey | ec.EllipticCurvePublicKey, str]:
    """A PEM public key or certificate -> (key, the one algorithm it may verify)."""
    try:
        data = Path(path).read_bytes()
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"SIDECAR_JWT_PUBLIC_KEY: cannot load {path!r}: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ConfigError("SIDECAR_JWT_PUBLIC_KEY must be an RSA or EC P-256 public key")


class Authenticator:
    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None):
        self._settings = settings
        self._user_claims = settings.user_claims
        self._secret = settings.jwt_secret
        self._static = load_public_key(settings.jwt_public_key) if settings.jwt_public_key else None
        self._own_http: httpx.AsyncClient | None = None
        self._jwks: JwksCache | None = None
        if settings.jwks_url:
            if http is None:
                http = self._own_http = httpx.AsyncClient(follow_redirects=False)
            self._jwks = JwksCache(
                settings.jwks_url,
                http,
                min_refetch_s=settings.jwks_min_refetch_s,
                timeout_s=settings.jwks_timeout_ms / 1000,
            )
        # token hash -> user id; an entry never outlives the token's `exp`.
        self._verified: TTLCache[str, str] = TTLCache(settings.token_cache_size)
        self._options: Options = {
            "require": ["exp"],
            "verify_aud": settings.jwt_audience is not None,
            "verify_iss": settings.jwt_issuer is not None,
        }

    async def start(self) -> None:
        settings = self._settings
        if settings.development_mode:
            log.warning(
                "DEVELOPMENT MODE: requests without a token act as user %r",
                settings.default_username,
            )
        if self._secret is not None and len(self._secret.encode()) < MIN_SECRET_BYTES:
            log.warning("SIDECAR_JWT_SECRET is shorter than %d bytes: easy to brute-force", MIN_SECRET_BYTES)
        if self._jwks is not None:
            await self._jwks.start()

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()
        if self._own_http is not None:
            await self._own_http.aclose()

    async def authenticate(self, header: str | None) -> Identity:
        # Refusals are not logged here: the request's access line carries the reason, and the
        # JWKS cache logs an unreachable issuer once per fetch, not once per request.
        token = bearer_token(header)
        settings = self._settings
        if token is None:
            if settings.development_mode and settings.default_username:
                return Identity(user_id=settings.default_username)
            raise Unauthorized("Missing bearer token", reason="missing", token_sent=False)
        digest = token_hash(token)
        user_id = self._verified.get(digest)
        if user_id is None:
            claims = await self._verify(token)
            user_id = self._user_id(claims)
            # PyJWT has already checked that `exp` is an integer in the future (within leeway).
            self._verified.set(digest, user_id, int(claims["exp"]) - time.time())
        return Identity(user_id=user_id, token_hash=digest, authorization=header)

    async def _verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthorized("Invalid token", reason="malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS:
            raise Unauthorized("Invalid token", reason="bad_algorithm")
        key, key_alg = await self._key_for(alg, header.get("kid"))
        settings = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[key_alg],
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                leeway=settings.jwt_leeway_s,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("Token expired", reason="expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("Invalid token", reason=_reason(exc)) from None
        return claims

    async def _key_for(self, alg: str, kid: object) -> tuple[VerificationKey, str]:
        """The key allowed to verify a token whose header says `alg` / `kid`, and its algorithm."""
        if alg == "HS256":
            if self._secret:
                return self._secret, "HS256"
            raise Unauthorized("Invalid token", reason="bad_algorithm")
        static = self._static if self._static is not None and self._static[1] == alg else None
        if self._jwks is not None and isinstance(kid, str) and kid:
            try:
                jwk = await self._jwks.get(kid)
            except (UnknownKey, Unavailable) as exc:
                if static is not None:  # a token of the static key may carry any kid
                    return static
                if isinstance(exc, Unavailable):
                    raise
                raise Unauthorized("Invalid token", reason="unknown_kid") from None
            return jwk, jwk.algorithm_name
        if static is not None:
            return static
        # JWKS keys are only ever chosen by kid; without a matching static key nothing is left.
        raise Unauthorized("Invalid token", reason="missing_kid" if self._jwks else "bad_algorithm")

    def _user_id(self, claims: dict[str, Any]) -> str:
        for claim in self._user_claims:
            value = claims.get(claim)
            if isinstance(value, str) and value:
                return value
        raise Unauthorized("Token names no user", reason="no_user")


def _reason(exc: jwt.InvalidTokenError) -> AuthFailure:
    reasons: list[tuple[type[jwt.InvalidTokenError], AuthFailure]] = [
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
