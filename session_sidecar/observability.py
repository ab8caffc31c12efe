"""Metrics, JSON logs and request ids: one access-log line and one observation per request."""

from __future__ import annotations

import logging
import math
import random
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from session_sidecar import __version__
from session_sidecar.errors import ApiError, Outage, Unauthorized, Unavailable

SERVICE = "session-sidecar"
access_log = logging.getLogger("session_sidecar.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Label values must stay bounded: any other method a client sends is counted as `other`.
_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
# Polled by probes and scrapers: counted, but no access line.
_UNLOGGED_ROUTES = frozenset({"healthz", "readyz", "metrics"})
# `sidecar_redis_errors_total{kind}`
_REDIS_KIND: dict[Outage, str] = {"redis_timeout": "timeout", "redis_error": "error"}

M = TypeVar("M", bound=MetricWrapperBase)


class _Children(Generic[M]):
    """A metric's children by label values, each looked up once: `labels()` checks and locks
    on every call, which the request path would pay a few times per request. The label
    values are bounded (routes, statuses, methods, reasons), so this stays small."""

    def __init__(self, metric: M):
        self._metric: M = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """Own registry per app, so several apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        # `*_created` series double the series count and no dashboard or alert reads them.
        # prometheus-client only offers this switch process-wide; this process serves one app.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
        self.registry = CollectorRegistry()
        # process_resident_memory_bytes (how the README's memory figure is watched), CPU, fds;
        # python_info; GC pressure.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        build = Gauge(
            "sidecar_build_info", "The running version (always 1)", ["version"], registry=self.registry
        )
        build.labels(__version__).set(1)
        self.requests = Counter(
            "sidecar_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "sidecar_request_duration_seconds",
            "HTTP request latency",
            ["route", "method", "status"],
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
        # Without an index (SIDECAR_INDEX_MODE=scan) there is no size or lag: NaN, never 0.0,
        # which would read as "empty and in sync". A live index replaces both with its own readings.
        self.index_runs.set(math.nan)
        self.index_lag.set(math.nan)
        self.index_enabled = Gauge(
            "sidecar_index_enabled",
            "1 while answers come from the live index, 0 while every request SCANs the keyspace",
            registry=self.registry,
        )
        self.scan_lookup = Gauge(
            "sidecar_scan_lookup_seconds",
            "One SCAN lookup, timed while keyspace notifications are off (NaN: not timed)",
            registry=self.registry,
        )
        self.scan_lookup.set(math.nan)
        self._requests = _Children(self.requests)
        self._latency = _Children(self.latency)
        self._auth_failures = _Children(self.auth_failures)
        self._redis_errors = _Children(self.redis_errors)
        self._upstream_errors = _Children(self.upstream_errors)

    def observe(self, route: str, method: str, status: str, elapsed_s: float) -> None:
        self._requests(route, status).inc()
        self._latency(route, method, status).observe(elapsed_s)

    def count_refusal(self, refusal: ApiError) -> None:
        """The one place a refusal becomes a metric: refused credentials by reason, a failed
        dependency by upstream (Redis by kind). The service's own refusals (400, 403, 404)
        are in `sidecar_requests_total` alone."""
        if isinstance(refusal, Unauthorized):
            self._auth_failures(refusal.reason).inc()
        elif isinstance(refusal, Unavailable):
            if refusal.upstream == "redis":
                self._redis_errors(_REDIS_KIND[refusal.reason]).inc()
            else:
                self._upstream_errors(refusal.upstream).inc()


def identified(scope: Scope, user_id: str) -> None:
    """The request's caller, for its access line."""
    scope["state"]["user_id"] = user_id


def refused(scope: Scope, refusal: ApiError) -> None:
    """The request was refused: its access line carries the reason, and the metrics count it."""
    # Without its traceback, whose frames hold the request and so this scope: kept, it would
    # make every refused request a reference cycle, left to the garbage collector.
    scope["state"]["refusal"] = refusal.with_traceback(None)


def route_label(scope: Scope, routes: Sequence[Route]) -> str:
    """The name of the route that served the request, or whose path it asked for (a preflight,
    answered before routing, or a method the route does not serve); `other` for no route.
    Bounded label values: never the raw path, which holds conversation ids."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return route.name if isinstance(route, Route) else "other"


class ObservabilityMiddleware:
    """Request id in and out, latency and status to metrics, one JSON log line per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[Route]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # An id for log lines, not a secret: no system call for each request (as uuid4 makes).
        request_id = _incoming_request_id(scope) or f"{random.getrandbits(128):032x}"
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
            route = route_label(scope, self.routes)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.observe(route, method, str(status), elapsed)
            refusal: ApiError | None = state.get("refusal")
            if refusal is not None:
                self.metrics.count_refusal(refusal)
            # The check first: below INFO the line's fields are not even gathered.
            if route not in _UNLOGGED_ROUTES and access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "request_id": request_id,
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "latency_ms": round(elapsed * 1000, 2),
                        "user_id": state.get("user_id"),
                        "reason": None if refusal is None else refusal.reason,
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
            # RFC 3339, UTC, milliseconds: what log pipelines parse without a custom format.
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": SERVICE,
            "version": __version__,
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
    # Library warnings (PyJWT's InsecureKeyLengthWarning, deprecations) become `py.warnings`
    # records in the JSON stream instead of raw lines on stderr.
    logging.captureWarnings(True)
    # Our own access line replaces uvicorn's (which prints full paths and no user).
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
