"""Settings are read in one place, cast strictly, never print secrets; bad config exits loudly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from session_sidecar.errors import ConfigError
from session_sidecar.settings import Settings

DEV = {"isDevelopmentMode": "enabled", "defaultUsername": "dev"}
# The least a production start needs: a way to verify tokens and the backend to ask.
PROD = {"SIDECAR_JWT_SECRET": "x", "SIDECAR_BACKEND_URL": "http://backend:8000"}


def test_defaults_match_the_spec() -> None:
    s = Settings.from_env(PROD)
    assert s.redis_url == "redis://localhost:6379/0"
    assert (s.stream_prefix, s.api_prefix, s.host, s.port) == ("chat:stream", "/api/v1", "0.0.0.0", 8080)
    assert (s.stale_after_s, s.default_duration_s, s.status_ttl_s, s.redis_timeout_ms) == (600, 60, 600, 500)
    assert (s.policy, s.access_cache_ttl_s, s.active_cursor) == ("backend", 30, "last")
    assert s.cors_origins == ("http://localhost:3000",)
    assert s.conversation_id_pattern == r"^[A-Za-z0-9._-]{1,128}$"
    assert not s.redis_cluster and s.development_mode is False


def test_every_variable_is_read() -> None:
    env = {
        "SIDECAR_REDIS_URL": "rediss://u:p@h:1/2",
        "SIDECAR_REDIS_CLUSTER": "true",
        "REDIS_STREAM_PREFIX": "x:y",
        "SIDECAR_API_PREFIX": "/p",
        "SIDECAR_HOST": "127.0.0.1",
        "SIDECAR_PORT": "9",
        "SIDECAR_JWT_SECRET": "s",
        "SIDECAR_JWT_ISSUER": "iss",
        "SIDECAR_JWT_AUDIENCE": "aud",
        "SIDECAR_STALE_AFTER_S": "5",
        "SIDECAR_DEFAULT_DURATION_S": "6",
        "SIDECAR_STATUS_TTL_S": "7",
        "SIDECAR_REDIS_TIMEOUT_MS": "8",
        "SIDECAR_ACCESS_CACHE_TTL_S": "9",
        "SIDECAR_CONVERSATION_ID_PATTERN": "^[a-z]+$",
        **DEV,
    }
    s = Settings.from_env(env)
    assert (s.redis_url, s.redis_cluster, s.stream_prefix, s.api_prefix) == (
        "rediss://u:p@h:1/2",
        True,
        "x:y",
        "/p",
    )
    assert (s.port, s.stale_after_s, s.default_duration_s, s.status_ttl_s, s.redis_timeout_ms) == (
        9,
        5,
        6,
        7,
        8,
    )
    assert (s.jwt_issuer, s.jwt_audience, s.access_cache_ttl_s) == ("iss", "aud", 9)
    assert s.development_mode and s.default_username == "dev"


def test_backend_redis_variables_are_the_fallback() -> None:
    env = {"REDISHOST": "cache", "REDISPORT": "6380", "REDISUSER": "app", "REDISPASSWORD": "p@ss:/", **DEV}
    assert Settings.from_env(env).redis_url == "redis://app:p%40ss%3A%2F@cache:6380/0"
    assert Settings.from_env({"REDISHOST": "cache", **DEV}).redis_url == "redis://cache:6379/0"
    explicit = {"SIDECAR_REDIS_URL": "redis://other:1/0", "REDISHOST": "cache", **DEV}
    assert Settings.from_env(explicit).redis_url == "redis://other:1/0"


def test_repr_never_shows_secrets() -> None:
    env = {**PROD, "SIDECAR_REDIS_URL": "redis://u:hunter2@h:1/0", "SIDECAR_JWT_SECRET": "topsecret"}
    s = Settings.from_env(env)
    assert "hunter2" not in repr(s) and "topsecret" not in repr(s) and "topsecret" not in str(s)
    assert "redis://u:***@h:1/0" in repr(s)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, "no way to verify tokens"),
        ({"SIDECAR_PORT": "http", **DEV}, "SIDECAR_PORT"),
        ({"SIDECAR_PORT": "70000", **DEV}, "SIDECAR_PORT"),
        ({"SIDECAR_REDIS_TIMEOUT_MS": "0", **DEV}, "SIDECAR_REDIS_TIMEOUT_MS"),
        ({"SIDECAR_ACCESS_POLICY": "anyone", **DEV}, "SIDECAR_ACCESS_POLICY"),
        ({"SIDECAR_ACCESS_POLICY": "backend", **DEV}, "SIDECAR_BACKEND_URL"),
        ({"SIDECAR_CONVERSATION_ID_PATTERN": "^[A-Za-z0-9:._-]+$", **DEV}, "must not admit ':'"),
        ({"SIDECAR_CONVERSATION_ID_PATTERN": "^.*$", **DEV}, "must not admit ':'"),
        ({"SIDECAR_CONVERSATION_ID_PATTERN": "([", **DEV}, "not a valid regex"),
        ({"SIDECAR_JWKS_URL": "https://x/jwks"}, "SIDECAR_JWT_ISSUER"),
        ({"SIDECAR_REDIS_URL": "http://x", **DEV}, "SIDECAR_REDIS_URL"),
        ({"SIDECAR_API_PREFIX": "api/v1", **DEV}, "SIDECAR_API_PREFIX"),
        ({"isDevelopmentMode": "enabled"}, "defaultUsername"),
        ({"SIDECAR_REDIS_SENTINELS": "h:26379", **DEV}, "SIDECAR_REDIS_SENTINEL_MASTER"),
        ({"REDIS_STREAM_PREFIX": "task", **DEV}, "REDIS_STREAM_PREFIX"),
        ({"SIDECAR_JWT_LEEWAY_S": "3600", **DEV}, "SIDECAR_JWT_LEEWAY_S"),
        ({"SIDECAR_BACKEND_URL": "ftp://backend", **DEV}, "SIDECAR_BACKEND_URL"),
        ({"REDIS_STREAM_PREFIX": "task:status:x", **DEV}, "REDIS_STREAM_PREFIX"),
        ({"SIDECAR_ACTIVE_CURSOR": "middle", **DEV}, "SIDECAR_ACTIVE_CURSOR"),
        ({"SIDECAR_CORS_ALLOWED_ORIGINS": " , ", **DEV}, "SIDECAR_CORS_ALLOWED_ORIGINS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace("[", r"\[")):
        Settings.from_env(env)


def test_development_mode_needs_the_exact_word() -> None:
    with pytest.raises(ConfigError, match="no way to verify"):
        Settings.from_env({"isDevelopmentMode": "true", "defaultUsername": "dev"})


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_") and k not in DEV}
    return subprocess.run(
        [sys.executable, "-m", "session_sidecar", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_refuses_to_start_without_verification_in_one_line() -> None:
    result = _cli("serve", env={})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("session-sidecar: no way to verify tokens")


def test_serve_refuses_bad_port_flag_value_in_one_line() -> None:
    result = _cli("serve", "--port", "0", env=PROD)
    assert result.returncode == 2 and "SIDECAR_PORT" in result.stderr


def test_serve_without_backend_url_or_explicit_run_owner_exits_2_naming_both() -> None:
    result = _cli("serve", env={"SIDECAR_JWT_SECRET": "x"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "SIDECAR_BACKEND_URL" in lines[0] and "SIDECAR_ACCESS_POLICY=run-owner" in lines[0]


def test_access_policy_in_force() -> None:
    assert Settings.from_env(PROD).policy == "backend"
    explicit = Settings.from_env({"SIDECAR_JWT_SECRET": "x", "SIDECAR_ACCESS_POLICY": "run-owner"})
    assert explicit.policy == "run-owner"
    # Development mode without a backend is single-user, as the backend's is; naming a policy wins.
    assert Settings.from_env(DEV).policy == "single-user"
    assert Settings.from_env({**DEV, "SIDECAR_ACCESS_POLICY": "run-owner"}).policy == "run-owner"
    assert Settings.from_env({**DEV, "SIDECAR_BACKEND_URL": "http://b"}).policy == "backend"


def test_cors_origins_fall_back_to_the_backends_variable() -> None:
    backend = {**DEV, "CORS_ALLOWED_ORIGINS": "https://app.example, http://localhost:3000"}
    assert Settings.from_env(backend).cors_origins == ("https://app.example", "http://localhost:3000")
    ours = {**backend, "SIDECAR_CORS_ALLOWED_ORIGINS": "https://only.example"}
    assert Settings.from_env(ours).cors_origins == ("https://only.example",)


def test_version_and_help() -> None:
    assert _cli("--version", env={}).stdout.strip() == "0.1.0"
    assert "serve" in _cli("--help", env={}).stdout
