"""Every setting, read from the environment in one place and cast strictly.

`Settings.from_env()` is the only reader of `os.environ` in the service; the
CLI overrides a few fields with `msgspec.structs.replace`. Bad values raise
`ConfigError` with a one-line reason that names the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec

from session_sidecar.errors import ConfigError

AccessPolicyName = Literal["run-owner", "backend"]
IndexMode = Literal["auto", "index", "scan"]
CursorChoice = Literal["last", "first"]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"
DEFAULT_CORS_ORIGINS = "http://localhost:3000"  # the backend's own default

# Strings a conversation id pattern must refuse: a colon would let `a:b`
# alias run `b...` of conversation `a` in the key schema.
_COLON_PROBES = (":", "a:b", "0:0", "a:", ":a", "A:B:C", "x-1:y_2.z")


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    redis_url: str = DEFAULT_REDIS_URL
    redis_cluster: bool = False
    redis_sentinels: str | None = None
    redis_sentinel_master: str | None = None
    stream_prefix: str = "chat:stream"
    api_prefix: str = "/api/v1"
    host: str = "0.0.0.0"
    port: int = 8080
    jwt_secret: str | None = None
    jwks_url: str | None = None
    jwt_public_key: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_s: int = 10
    jwt_user_claims: str = "user_id,sub"
    token_cache_size: int = 10000
    jwks_min_refetch_s: float = 10.0
    jwks_timeout_ms: int = 3000
    # None: not named. `backend` when a backend URL is set; single-user in development mode.
    access_policy: AccessPolicyName | None = None
    backend_url: str | None = None
    access_cache_ttl_s: int = 30
    access_cache_size: int = 10000
    backend_timeout_ms: int = 2000
    cors_allowed_origins: str = DEFAULT_CORS_ORIGINS
    active_cursor: CursorChoice = "last"
    conversation_id_pattern: str = DEFAULT_CONVERSATION_ID_PATTERN
    stale_after_s: int = 600
    default_duration_s: int = 60
    status_ttl_s: int = 600
    redis_timeout_ms: int = 500
    index_mode: IndexMode = "auto"
    index_resync_s: int = 300
    redis_config_set: bool = False
    shutdown_timeout_s: int = 10
    log_level: str = "info"
    development_mode: bool = False
    default_username: str | None = None

    def __repr__(self) -> str:
        # Never print secrets: settings end up in logs and tracebacks.
        shown = []
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name == "redis_url":
                value = redact_url(value)
            elif name == "jwt_secret" and value is not None:
                value = "***"
            shown.append(f"{name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    @property
    def user_claims(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.jwt_user_claims.split(",") if c.strip())

    @property
    def cors_origins(self) -> tuple[str, ...]:
        return tuple(o.strip() for o in self.cors_allowed_origins.split(",") if o.strip())

    @property
    def policy(self) -> Literal["backend", "run-owner", "single-user"]:
        """The access policy in force (SPEC section 5); `validate()` refuses the unservable case."""
        if self.access_policy is not None:
            return self.access_policy
        if self.backend_url or not self.development_mode:
            return "backend"
        # The backend's development mode is single-user: every run is the one user's.
        return "single-user"

    @property
    def verification_configured(self) -> bool:
        return bool(self.jwt_secret or self.jwks_url or self.jwt_public_key)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        for var, field in ENV_VARS.items():
            value = env.get(var)
            if value is not None and value != "":
                raw[field] = value
        if "development_mode" in raw:
            raw["development_mode"] = str(raw["development_mode"]).strip().lower() == "enabled"
        if "redis_url" not in raw:
            raw["redis_url"] = _backend_redis_url(env)
        if "cors_allowed_origins" not in raw and env.get("CORS_ALLOWED_ORIGINS"):
            # The backend's own variable: one list of origins for the whole API.
            raw["cors_allowed_origins"] = env["CORS_ALLOWED_ORIGINS"]
        try:
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(_explain(exc)) from None
        settings.validate()
        return settings

    def validate(self) -> None:
        """Checks that span fields; raises ConfigError naming the variable."""
        url = urlsplit(self.redis_url)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("SIDECAR_REDIS_URL must start with redis://, rediss:// or unix://")
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ConfigError("SIDECAR_REDIS_SENTINELS and SIDECAR_REDIS_SENTINEL_MASTER go together")
        stream, status = self.stream_prefix + ":", "task:status:"
        if not self.stream_prefix or status.startswith(stream) or stream.startswith(status):
            # e.g. `task`: then `task:status:c:r` would read as the stream of conversation `status`.
            raise ConfigError("REDIS_STREAM_PREFIX must not overlap the status keys' `task:status`")
        if not self.api_prefix.startswith("/") or self.api_prefix.endswith("/"):
            raise ConfigError("SIDECAR_API_PREFIX must start with '/' and not end with one")
        try:
            pattern = re.compile(self.conversation_id_pattern)
        except re.error as exc:
            raise ConfigError(f"SIDECAR_CONVERSATION_ID_PATTERN is not a valid regex: {exc}") from None
        if any(pattern.fullmatch(probe) for probe in _COLON_PROBES):
            raise ConfigError("SIDECAR_CONVERSATION_ID_PATTERN must not admit ':'")
        for var, value in (
            ("SIDECAR_PORT", self.port),
            ("SIDECAR_REDIS_TIMEOUT_MS", self.redis_timeout_ms),
            ("SIDECAR_STALE_AFTER_S", self.stale_after_s),
            ("SIDECAR_DEFAULT_DURATION_S", self.default_duration_s),
            ("SIDECAR_STATUS_TTL_S", self.status_ttl_s),
            ("SIDECAR_INDEX_RESYNC_S", self.index_resync_s),
            ("SIDECAR_JWKS_TIMEOUT_MS", self.jwks_timeout_ms),
            ("SIDECAR_BACKEND_TIMEOUT_MS", self.backend_timeout_ms),
        ):
            if value <= 0:
                raise ConfigError(f"{var} must be a positive number, got {value}")
        if self.port > 65535:
            raise ConfigError(f"SIDECAR_PORT must be at most 65535, got {self.port}")
        if self.access_cache_ttl_s < 0 or self.jwt_leeway_s < 0:
            raise ConfigError("SIDECAR_ACCESS_CACHE_TTL_S and SIDECAR_JWT_LEEWAY_S must be >= 0")
        if self.token_cache_size < 0 or self.access_cache_size < 0 or self.jwks_min_refetch_s < 0:
            raise ConfigError(
                "SIDECAR_TOKEN_CACHE_SIZE, SIDECAR_ACCESS_CACHE_SIZE and "
                "SIDECAR_JWKS_MIN_REFETCH_S must be >= 0"
            )
        if not self.user_claims:
            raise ConfigError("SIDECAR_JWT_USER_CLAIMS must name at least one claim")
        if self.jwt_leeway_s > 300:
            # Leeway stretches every token's life: minutes of it would accept long-expired tokens.
            raise ConfigError(f"SIDECAR_JWT_LEEWAY_S must be at most 300, got {self.jwt_leeway_s}")
        if self.backend_url and urlsplit(self.backend_url).scheme not in ("http", "https"):
            raise ConfigError("SIDECAR_BACKEND_URL must be an http:// or https:// URL")
        if self.access_policy == "backend" and not self.backend_url:
            raise ConfigError("SIDECAR_ACCESS_POLICY=backend needs SIDECAR_BACKEND_URL")
        if not self.cors_origins:
            raise ConfigError("SIDECAR_CORS_ALLOWED_ORIGINS must name at least one origin")
        if self.jwks_url and not (self.jwt_issuer and self.jwt_audience):
            raise ConfigError(
                "SIDECAR_JWKS_URL needs SIDECAR_JWT_ISSUER and SIDECAR_JWT_AUDIENCE: "
                "without them any token from that issuer's keys would pass"
            )
        if self.development_mode and not self.default_username:
            raise ConfigError("isDevelopmentMode=enabled needs defaultUsername")
        if not self.verification_configured and not self.development_mode:
            raise ConfigError(
                "no way to verify tokens: set SIDECAR_JWT_SECRET, SIDECAR_JWKS_URL or "
                "SIDECAR_JWT_PUBLIC_KEY (or isDevelopmentMode=enabled with defaultUsername)"
            )
        if self.policy == "backend" and not self.backend_url:
            raise ConfigError(
                "no access policy: set SIDECAR_BACKEND_URL (the default `backend` policy asks the "
                "backend) or SIDECAR_ACCESS_POLICY=run-owner (only if clients name runs by user id)"
            )


# Environment variable -> Settings field. The backend's own names are kept
# where the sidecar shares a meaning with it.
ENV_VARS: dict[str, str] = {
    "SIDECAR_REDIS_URL": "redis_url",
    "SIDECAR_REDIS_CLUSTER": "redis_cluster",
    "SIDECAR_REDIS_SENTINELS": "redis_sentinels",
    "SIDECAR_REDIS_SENTINEL_MASTER": "redis_sentinel_master",
    "REDIS_STREAM_PREFIX": "stream_prefix",
    "SIDECAR_API_PREFIX": "api_prefix",
    "SIDECAR_HOST": "host",
    "SIDECAR_PORT": "port",
    "SIDECAR_JWT_SECRET": "jwt_secret",
    "SIDECAR_JWKS_URL": "jwks_url",
    "SIDECAR_JWT_PUBLIC_KEY": "jwt_public_key",
    "SIDECAR_JWT_ISSUER": "jwt_issuer",
    "SIDECAR_JWT_AUDIENCE": "jwt_audience",
    "SIDECAR_JWT_LEEWAY_S": "jwt_leeway_s",
    "SIDECAR_JWT_USER_CLAIMS": "jwt_user_claims",
    "SIDECAR_TOKEN_CACHE_SIZE": "token_cache_size",
    "SIDECAR_JWKS_MIN_REFETCH_S": "jwks_min_refetch_s",
    "SIDECAR_JWKS_TIMEOUT_MS": "jwks_timeout_ms",
    "SIDECAR_ACCESS_POLICY": "access_policy",
    "SIDECAR_BACKEND_URL": "backend_url",
    "SIDECAR_ACCESS_CACHE_TTL_S": "access_cache_ttl_s",
    "SIDECAR_ACCESS_CACHE_SIZE": "access_cache_size",
    "SIDECAR_BACKEND_TIMEOUT_MS": "backend_timeout_ms",
    "SIDECAR_CORS_ALLOWED_ORIGINS": "cors_allowed_origins",
    "SIDECAR_ACTIVE_CURSOR": "active_cursor",
    "SIDECAR_CONVERSATION_ID_PATTERN": "conversation_id_pattern",
    "SIDECAR_STALE_AFTER_S": "stale_after_s",
    "SIDECAR_DEFAULT_DURATION_S": "default_duration_s",
    "SIDECAR_STATUS_TTL_S": "status_ttl_s",
    "SIDECAR_REDIS_TIMEOUT_MS": "redis_timeout_ms",
    "SIDECAR_INDEX_MODE": "index_mode",
    "SIDECAR_INDEX_RESYNC_S": "index_resync_s",
    "SIDECAR_REDIS_CONFIG_SET": "redis_config_set",
    "SIDECAR_SHUTDOWN_TIMEOUT_S": "shutdown_timeout_s",
    "SIDECAR_LOG_LEVEL": "log_level",
    "isDevelopmentMode": "development_mode",
    "defaultUsername": "default_username",
}
_FIELD_TO_ENV = {field: var for var, field in ENV_VARS.items()}


def _backend_redis_url(env: Mapping[str, str]) -> str:
    """The URL the backend itself would use, from REDISHOST/REDISPORT/REDISUSER/REDISPASSWORD."""
    host = env.get("REDISHOST")
    if not host:
        return DEFAULT_REDIS_URL
    port = env.get("REDISPORT") or "6379"
    user = env.get("REDISUSER") or ""
    password = env.get("REDISPASSWORD") or ""
    auth = ""
    if user or password:
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "") + "@"
    return f"redis://{auth}{host}:{port}/0"


def redact_url(url: str) -> str:
    """`redis://user:secret@host` -> `redis://user:***@host`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _explain(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    match = re.search(r"at `\$\.(\w+)`", message)
    if match:
        var = _FIELD_TO_ENV.get(match.group(1), match.group(1))
        return f"{var}: {message.split(' - at ')[0]}"
    return message
