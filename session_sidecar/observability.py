"""Metrics, JSON logs and request ids: one access-log line and one observation per request."""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("session_sidecar.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Metrics:
    """Own registry per app, so several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sidecar_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "sidecar_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "sidecar_redis_errors", "Redis failures by kind (timeout, error)", ["kind"],
            registry=self.registry,
        )  # fmt: skip
        self.auth_failures = Counter(
            "sidecar_auth_failures", "Refused credentials by reason", ["reason"], registry=self.registry
        )
        self.upstream_errors = Counter(
            "sidecar_upstream_errors", "JWKS issuer or backend failures", ["upstream"],
            registry=self.registry,
        )  # fmt: skip
        self.index_runs = Gauge("sidecar_index_runs", "Runs in the live index", registry=self.registry)
        self.index_lag = Gauge(
            "sidecar_index_lag_seconds",
            "Seconds since the index last heard from Redis (notification or sync)",
            registry=self.registry,
        )


def route_label(path: str) -> str:
    # Bounded label values: never the raw path, which holds conversation ids.
    if path.endswith("/active-session"):
        return "active-session"
    if path.endswith("/task-status"):
        return "task-status"
    if path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        return path[1:]
    return "other"


class ObservabilityMiddleware:
    """Request id in and out, latency and status to metrics, one JSON log line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = route_label(scope["path"])
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            if route not in ("healthz", "readyz", "metrics"):
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 2),
                        "user_id": state.get("user_id"),
                        "reason": state.get("reason"),
                    },
                )


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _REQUEST_ID.match(text) else None
    return None


_LOG_FIELDS = ("request_id", "method", "route", "status", "latency_ms", "user_id", "reason")
_json = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in _LOG_FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _json.encode(entry).decode()


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our own access line replaces uvicorn's (which prints full paths and no user).
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
