"""Constants and helpers shared by the benchmark's apps, fill step and driver."""

from __future__ import annotations

import time

import jwt

API_PREFIX = "/api/v1"
STREAM_PREFIX = "chat:stream"
STATUS_PREFIX = "task:status"
# HS256 secret shared by the three servers; long enough that PyJWT does not warn.
JWT_SECRET = "bench-only-secret-0123456789abcdef0123456789abcdef0123456789abcdef"
BENCH_USER = "benchuser42"
# Keyspace events the sidecar's index mode needs; set on every Redis the bench starts.
NOTIFY_KEYSPACE_EVENTS = "Eg$xtn"


def mint_token(user_id: str = BENCH_USER, secret: str = JWT_SECRET, ttl_s: int = 4 * 3600) -> str:
    """An HS256 token with `exp` and a `user_id` claim, as the backend's clients send."""
    now = int(time.time())
    return jwt.encode(
        {"user_id": user_id, "sub": user_id, "iat": now, "exp": now + ttl_s},
        secret,
        algorithm="HS256",
    )


def active_session_path(conversation_id: str) -> str:
    return f"{API_PREFIX}/conversations/{conversation_id}/active-session"
