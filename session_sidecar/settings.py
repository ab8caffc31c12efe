"""Every setting, read from the environment in one place and cast strictly.

`Settings.from_env()` is the only reader of `os.environ` in the service; the
CLI overrides a few fields with `msgspec.structs.replace`. Bad values raise
`ConfigError` with a one-line reason that names the variable.
"""

from __future__ import annotations

import math
import os
import re
import typing
from collections.abc import Mapping
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec

from session_sidecar.errors import ConfigError

AccessPolicyName = Literal["run-owner", "backend"]
IndexMode = Literal["auto", "index", "scan"]
CursorChoice = Literal["last", "first"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]

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
    log_level: LogLevel = "info"
    development_mode: bool = False
    default_username: str | None = None
    # Following a run (SPEC 8.1, 8.2, 8.4): 0 turns a keepalive off.
    resume_keepalive_s: float = 15.0
    sse_keepalive_s: float = 15.0
    sse_max_s: float = 600.0
    max_streams: int = 10000
    # Watch (SPEC 8.3): the longest hold, and how many requests one process holds at once.
    watch_max_s: float = 50.0
    max_waiters: int = 10000
    # Cluster and Sentinel: each request's facts from a replica (README, "Redis topologies").
    read_from_replicas: bool = False
    # Processes serving the one socket, each with its own index, hub and watch.
    workers: int = 1

    def redacted(self) -> dict[str, object]:
        """Every field, secrets hidden: what repr and `session-sidecar config` show."""
        shown: dict[str, object] = {}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in ("redis_url", "backend_url", "jwks_url") and value is not None:
                value = redact_url(value)
            elif name == "jwt_secret" and value is not None:
                value = "***"
            shown[name] = value
        return shown

    def __repr__(self) -> str:
        # Never print secrets: settings end up in logs and tracebacks.
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in self.redacted().items())})"

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
        if "log_level" in raw:
            raw["log_level"] = str(raw["log_level"]).lower()  # `INFO` as often as `info`
        if "redis_url" not in raw:
            raw["redis_url"] = _backend_redis_url(env)
        if "cors_allowed_origins" not in raw and env.get("CORS_ALLOWED_ORIGINS"):
            # The backend's own variable: one list of origins for the whole API.
            raw["cors_allowed_origins"] = env["CORS_ALLOWED_ORIGINS"]
        try:
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(_explain(exc, raw)) from None
        settings.validate()
        return settings

    def validate(self) -> None:
        """Checks that span fields; raises ConfigError naming the variable."""
        url = urlsplit(self.redis_url)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("SIDECAR_REDIS_URL must start with redis://, rediss:// or unix://")
        try:
            url.port  # noqa: B018 (parsed on access: a non-numeric port raises here)
        except ValueError:
            raise ConfigError("SIDECAR_REDIS_URL has a port that is not a number") from None
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ConfigError("SIDECAR_REDIS_SENTINELS and SIDECAR_REDIS_SENTINEL_MASTER go together")
        nodes = [node.strip() for node in self.redis_sentinels.split(",")] if self.redis_sentinels else []
        bad = [node for node in nodes if not re.fullmatch(r"\S+:\d{1,5}", node)]
        if bad:
            raise ConfigError(f"SIDECAR_REDIS_SENTINELS must be host:port,host:port; got {bad[0]!r}")
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
        if self.shutdown_timeout_s < 0:
            raise ConfigError(f"SIDECAR_SHUTDOWN_TIMEOUT_S must be >= 0, got {self.shutdown_timeout_s}")
        if not math.isfinite(self.jwks_min_refetch_s):
            raise ConfigError(f"SIDECAR_JWKS_MIN_REFETCH_S must be a number, got {self.jwks_min_refetch_s}")
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
        for var, seconds in (
            ("SIDECAR_RESUME_KEEPALIVE_S", self.resume_keepalive_s),
            ("SIDECAR_SSE_KEEPALIVE_S", self.sse_keepalive_s),
        ):
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ConfigError(f"{var} must be a number >= 0 (0: no keepalive), got {seconds}")
        if not (math.isfinite(self.sse_max_s) and self.sse_max_s > 0):
            raise ConfigError(f"SIDECAR_SSE_MAX_S must be a positive number, got {self.sse_max_s}")
        if self.max_streams <= 0:
            raise ConfigError(f"SIDECAR_MAX_STREAMS must be a positive number, got {self.max_streams}")
        if not (math.isfinite(self.watch_max_s) and self.watch_max_s >= 0):
            raise ConfigError(f"SIDECAR_WATCH_MAX_S must be a number >= 0, got {self.watch_max_s}")
        if self.max_waiters < 0:
            raise ConfigError(f"SIDECAR_MAX_WAITERS must be >= 0, got {self.max_waiters}")
        if self.read_from_replicas and not (self.redis_cluster or self.redis_sentinels):
            raise ConfigError(
                "SIDECAR_READ_FROM_REPLICAS needs SIDECAR_REDIS_CLUSTER or SIDECAR_REDIS_SENTINELS"
            )
        if self.workers < 1:
            raise ConfigError(f"SIDECAR_WORKERS must be at least 1, got {self.workers}")


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
    "SIDECAR_RESUME_KEEPALIVE_S": "resume_keepalive_s",
    "SIDECAR_SSE_KEEPALIVE_S": "sse_keepalive_s",
    "SIDECAR_SSE_MAX_S": "sse_max_s",
    "SIDECAR_MAX_STREAMS": "max_streams",
    "SIDECAR_WATCH_MAX_S": "watch_max_s",
    "SIDECAR_MAX_WAITERS": "max_waiters",
    "SIDECAR_READ_FROM_REPLICAS": "read_from_replicas",
    "SIDECAR_WORKERS": "workers",
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


def _explain(exc: msgspec.ValidationError, raw: Mapping[str, object]) -> str:
    """`VAR: what was expected, got what`: the accepted values of an enum or a bool included."""
    message = str(exc)
    match = re.search(r"at `\$\.(\w+)`", message)
    if not match:
        return message
    field = match.group(1)
    var = _FIELD_TO_ENV.get(field, field)
    got = repr(raw.get(field))[:80]
    kind = {f.name: f.type for f in msgspec.structs.fields(Settings)}.get(field)
    accepted = _accepted(kind)
    if accepted:
        return f"{var}: {got} is not one of {', '.join(map(str, accepted))}"
    if kind is bool:
        return f"{var}: expected true or false (or 1 or 0), got {got}"
    if kind is int:
        return f"{var}: expected a whole number, got {got}"
    if kind is float:
        return f"{var}: expected a number, got {got}"
    return f"{var}: {message.split(' - at ')[0]}"


def _accepted(kind: object) -> tuple[object, ...]:
    """The values a Literal field (optional or not) accepts; () for any other type."""
    if typing.get_origin(kind) is Literal:
        return typing.get_args(kind)
    return tuple(value for arg in typing.get_args(kind) for value in _accepted(arg))
