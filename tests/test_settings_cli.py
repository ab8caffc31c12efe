"""Settings are read in one place, cast strictly, never print secrets; bad config exits loudly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from session_sidecar.errors import ConfigError
from session_sidecar.settings import ENV_VARS, Settings

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
        ({"SIDECAR_SHUTDOWN_TIMEOUT_S": "-5", **DEV}, "SIDECAR_SHUTDOWN_TIMEOUT_S must be >= 0"),
        ({"SIDECAR_JWKS_MIN_REFETCH_S": "nan", **DEV}, "SIDECAR_JWKS_MIN_REFETCH_S"),
        ({"SIDECAR_REDIS_URL": "redis://h:port/0", **DEV}, "SIDECAR_REDIS_URL"),
        (
            {"SIDECAR_REDIS_SENTINELS": "h", "SIDECAR_REDIS_SENTINEL_MASTER": "m", **DEV},
            "SIDECAR_REDIS_SENTINELS must be host:port",
        ),
        # Enum and bool errors list what is accepted; number errors show what was given.
        (
            {"SIDECAR_LOG_LEVEL": "verbose", **DEV},
            "SIDECAR_LOG_LEVEL: 'verbose' is not one of critical, error",
        ),
        ({"SIDECAR_ACCESS_POLICY": "owner", **DEV}, "'owner' is not one of run-owner, backend"),
        ({"SIDECAR_INDEX_MODE": "live", **DEV}, "SIDECAR_INDEX_MODE: 'live' is not one of auto, index, scan"),
        ({"SIDECAR_REDIS_CLUSTER": "yes", **DEV}, "SIDECAR_REDIS_CLUSTER: expected true or false"),
        ({"SIDECAR_PORT": "80.5", **DEV}, "SIDECAR_PORT: expected a whole number, got '80.5'"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace("(", r"\(").replace("[", r"\[")):
        Settings.from_env(env)


def test_log_level_is_one_of_the_levels_in_any_case() -> None:
    assert Settings.from_env({**DEV, "SIDECAR_LOG_LEVEL": "DEBUG"}).log_level == "debug"
    assert Settings.from_env(DEV).log_level == "info"


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


def test_serve_help_points_to_every_setting() -> None:
    text = " ".join(_cli("serve", "--help", env={}).stdout.split())  # unwrapped
    assert "README.md, section Settings" in text and "`session-sidecar config`" in text
    for var in ENV_VARS:
        assert var in text, var


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SIDECAR_LOG_LEVEL": "verbose"},
            "SIDECAR_LOG_LEVEL: 'verbose' is not one of critical, error, warning",
        ),
        ({"SIDECAR_SHUTDOWN_TIMEOUT_S": "-5"}, "SIDECAR_SHUTDOWN_TIMEOUT_S must be >= 0"),
        ({"SIDECAR_HOST": "no-such-host.invalid"}, "SIDECAR_HOST 'no-such-host.invalid' does not resolve"),
        (
            {"SIDECAR_ACCESS_POLICY": "owner"},
            "SIDECAR_ACCESS_POLICY: 'owner' is not one of run-owner, backend",
        ),
        (
            {"SIDECAR_REDIS_CLUSTER": "yes"},
            "SIDECAR_REDIS_CLUSTER: expected true or false (or 1 or 0), got 'yes'",
        ),
    ],
    ids=["log-level", "shutdown-timeout", "host", "enum", "bool"],
)
def test_serve_refuses_each_bad_value_in_one_line(env: dict[str, str], expected: str) -> None:
    # Checked before anything is started: no Redis is needed to be refused.
    result = _cli("serve", env={**PROD, **env})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"session-sidecar: {expected}"), lines


def test_config_prints_the_settings_in_force_without_secrets() -> None:
    env = {
        **PROD,
        "SIDECAR_JWT_SECRET": "topsecret",
        "SIDECAR_REDIS_URL": "redis://app:hunter2@cache:6380/0",
        "SIDECAR_BACKEND_URL": "http://svc:pw@backend:8000",
        "SIDECAR_REDIS_CLUSTER": "1",
        "SIDECAR_LOG_LEVEL": "WARNING",
    }
    result = _cli("config", env=env)
    assert result.returncode == 0, result.stderr
    assert "topsecret" not in result.stdout and "hunter2" not in result.stdout and ":pw@" not in result.stdout
    lines = result.stdout.splitlines()
    values = dict(line.split("=", 1) for line in lines if not line.startswith("#"))
    assert list(values) == list(ENV_VARS)  # one line per variable, in the README's order
    assert values["SIDECAR_REDIS_URL"] == "redis://app:***@cache:6380/0"
    assert values["SIDECAR_JWT_SECRET"] == "***"
    assert values["SIDECAR_BACKEND_URL"] == "http://svc:***@backend:8000"
    assert (values["SIDECAR_REDIS_CLUSTER"], values["SIDECAR_LOG_LEVEL"]) == ("true", "warning")
    assert (values["SIDECAR_PORT"], values["SIDECAR_JWKS_URL"], values["isDevelopmentMode"]) == (
        "8080",
        "",
        "disabled",
    )
    assert "# access policy in force: backend" in lines
    # Pasted back as an environment (secrets supplied again), they are the same settings.
    secrets = {var: env[var] for var in ("SIDECAR_JWT_SECRET", "SIDECAR_REDIS_URL", "SIDECAR_BACKEND_URL")}
    assert Settings.from_env({**{k: v for k, v in values.items() if v}, **secrets}) == Settings.from_env(env)


def test_config_refuses_bad_settings_in_one_line() -> None:
    result = _cli("config", env={**PROD, "SIDECAR_INDEX_MODE": "live"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "session-sidecar: SIDECAR_INDEX_MODE: 'live' is not one of auto, index, scan"
    ]
