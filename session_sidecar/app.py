"""The application factory: builds every part once, wires the routes, owns start and stop."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from session_sidecar import __version__, routes
from session_sidecar.access import AccessPolicy, make_policy
from session_sidecar.auth import Authenticator
from session_sidecar.cors import FlatCORSMiddleware
from session_sidecar.errors import ApiError
from session_sidecar.index import IndexedFinder, LiveIndex
from session_sidecar.models import openapi_schema
from session_sidecar.observability import Metrics, ObservabilityMiddleware
from session_sidecar.sessions import SessionService
from session_sidecar.settings import Settings, redact_url
from session_sidecar.store.client import RedisClient, create_client
from session_sidecar.store.facts import RunFinder, ScanFinder
from session_sidecar.store.keys import KeySchema
from session_sidecar.streams import endpoints as streams
from session_sidecar.streams.hub import StreamHub
from session_sidecar.streams.response import BODY_SEND
from session_sidecar.watch import WatchHub

log = logging.getLogger("session_sidecar")


class _App(Starlette):
    """Starlette, which first keeps the server's own `send` for streamed bodies (`BODY_SEND`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[BODY_SEND] = send
        await super().__call__(scope, receive, send)


class Sidecar:
    """Everything a request needs, built once per process."""

    def __init__(self, settings: Settings, client: RedisClient | None = None):
        self.settings = settings
        self.client = client if client is not None else create_client(settings)
        # What each request reads, always within its budget: a client without timeouts of its
        # own (see create_client), from replicas with SIDECAR_READ_FROM_REPLICAS; the rest
        # (the index, the hub, the watch) on `client`. A client given (tests) serves both, and
        # so does Sentinel's primary client: after a failover the index drops its pooled
        # connections to the former primary (topology.py), which a second pool would keep.
        self.reads = self.client
        if settings.read_from_replicas:
            self.reads = create_client(settings, replicas=True, budgeted=True)
        elif client is None and not settings.redis_sentinels:
            self.reads = create_client(settings, budgeted=True)
        self.metrics = Metrics()
        self.authenticator = Authenticator(settings)
        self.policy: AccessPolicy = make_policy(settings)
        schema = KeySchema(settings.stream_prefix)
        scan = ScanFinder(self.reads, schema)
        self.index: LiveIndex | None = None
        finder: RunFinder = scan
        if settings.index_mode != "scan":
            self.index = LiveIndex(settings, self.client, schema, self.metrics)
            finder = IndexedFinder(self.index, scan)
        self.sessions = SessionService(settings, self.client, finder, self.reads)
        self.hub = StreamHub(settings, self.client)
        self.watch = WatchHub(settings, self.sessions, self.index, self.metrics)
        self.id_pattern = re.compile(settings.conversation_id_pattern)
        self.openapi_json = msgspec.json.encode(
            openapi_schema(settings.api_prefix, __version__, settings.conversation_id_pattern)
        )

    async def start(self) -> None:
        log.info(
            "starting: redis %s, policy %s, stream prefix %r",
            redact_url(self.settings.redis_url),
            self.settings.policy,
            self.settings.stream_prefix,
        )
        try:
            await self.authenticator.start()
            if self.index is not None:
                self.index.start()
            self.hub.start()
            self.watch.start()
        except BaseException:
            await self.close()  # the lifespan closes only what started: release what did
            raise

    async def close(self) -> None:
        """Release every part, each even if another fails; the index first, as it uses the client."""
        async with contextlib.AsyncExitStack() as parts:
            parts.push_async_callback(self.client.aclose)
            if self.reads is not self.client:
                parts.push_async_callback(self.reads.aclose)
            parts.push_async_callback(self.policy.close)
            parts.push_async_callback(self.authenticator.close)
            if self.index is not None:
                parts.push_async_callback(self.index.close)  # bounded, see LiveIndex.close
            parts.push_async_callback(self.hub.close)  # ends the open streams first
            parts.push_async_callback(self.watch.close)  # answers held requests, while Redis is open

    def begin_shutdown(self) -> None:
        """A stop began: held watch requests get their answer now, not when their wait ends
        (uvicorn waits for running requests before the lifespan's shutdown; see cli.py)."""
        self.watch.begin_shutdown()

    async def not_ready_reason(self) -> str | None:
        try:
            await self.sessions.ping()
        except ApiError as exc:
            return exc.message
        # Scan mode is the operator's explicit choice of SCAN per request: Redis alone decides.
        return None if self.index is None else self.index.not_ready_reason()


def create_app(settings: Settings, *, client: RedisClient | None = None) -> Starlette:
    sidecar = Sidecar(settings, client)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await sidecar.start()
        try:
            yield
        finally:
            await sidecar.close()

    base = f"{settings.api_prefix}/conversations/{{conversation_id}}"
    # Each route's name is its `route` in the metrics and the access log.
    served = [
        Route(f"{base}/active-session", routes.active_session, methods=["GET"], name="active-session"),
        Route(f"{base}/task-status", routes.task_status, methods=["GET"], name="task-status"),
        Route(f"{base}/resume/{{session_id:path}}", streams.resume, methods=["POST"], name="resume"),
        Route(f"{base}/events", streams.events, methods=["GET"], name="events"),
        Route("/healthz", routes.healthz, methods=["GET"], name="healthz"),
        Route("/readyz", routes.readyz, methods=["GET"], name="readyz"),
        Route("/metrics", routes.MetricsApp(sidecar.metrics.registry), methods=["GET"], name="metrics"),
        Route("/openapi.json", routes.openapi, methods=["GET"], name="openapi.json"),
        Route("/docs", routes.docs, methods=["GET"], name="docs"),
    ]
    app = _App(
        routes=served,
        middleware=[
            # Outermost, so preflights get a request id and an access log line too.
            Middleware(ObservabilityMiddleware, metrics=sidecar.metrics, routes=served),
            # Preflights are answered here, before any route: no token, no auth failure counted.
            Middleware(
                FlatCORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_credentials=True,
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["ETag"],
            ),
        ],
        exception_handlers={HTTPException: routes.http_exception, Exception: routes.server_error},
        lifespan=lifespan,
    )
    app.state.sidecar = sidecar
    return app
