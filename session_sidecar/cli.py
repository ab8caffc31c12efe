"""`session-sidecar serve | demo | simulate | config`: fill the settings, then run.

Bad configuration exits with status 2 and one line saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import importlib.util
import logging
import os
import resource
import signal
import socket
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import uvicorn

from session_sidecar import __version__
from session_sidecar.errors import ConfigError
from session_sidecar.httpguard import GuardedHttpToolsProtocol
from session_sidecar.observability import configure_logging
from session_sidecar.settings import ENV_VARS, Settings

_uvicorn_log = logging.getLogger("uvicorn.error")
# An idle kept-alive connection is closed after this: longer than the 60 s after which
# nginx (upstream `keepalive_timeout`) and cloud load balancers drop theirs, so that they
# always close first; the other way round, one may reuse a connection as it closes (a 502).
KEEP_ALIVE_S = 75
CONCURRENCY_HEADROOM = 1024
# Descriptors kept for what is not a client: the Redis pool (64), the hub and index
# connections, JWKS and backend clients, listening sockets, logs.
FILES_RESERVED = 256
SETTINGS_HELP = (
    "Settings come from these environment variables (README.md, section Settings; "
    "`session-sidecar config` prints the values in force): " + ", ".join(ENV_VARS) + "."
)


def uvicorn_config(app: object, settings: Settings, **extra: Any) -> uvicorn.Config:
    has = importlib.util.find_spec
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        **extra,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if has("uvloop") else "asyncio",
        # httptools (uvicorn[standard] always installs it), with limits on abusive clients.
        http=GuardedHttpToolsProtocol,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        # SIGTERM: stop accepting, let in-flight requests finish, but not forever.
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        # Limits on clients, docs/operations.md ("Clients"); httpguard.py adds the rest.
        timeout_keep_alive=KEEP_ALIVE_S,
        limit_concurrency=concurrency_limit(settings),
    )


def concurrency_limit(settings: Settings) -> int:
    """Open connections (idle ones included), and requests in progress, past which uvicorn
    answers new requests 503 at once: room for every stream and held watch request the
    settings allow, plus CONCURRENCY_HEADROOM for the quick ones, but never more than the
    process's open-file limit leaves (past it, accepting and Redis connects would fail)."""
    wanted = settings.max_streams + settings.max_waiters + CONCURRENCY_HEADROOM
    files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if files == resource.RLIM_INFINITY:
        return wanted
    return max(min(wanted, files - FILES_RESERVED), 1)


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to, as uvicorn would bind them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            f"SIDECAR_HOST {host!r} does not resolve ({exc.strerror}): set SIDECAR_HOST or --host"
        ) from None
    sockets: list[socket.socket] = []
    try:
        for family, address in dict.fromkeys((info[0], info[4]) for info in infos):
            sockets.append(socket.create_server(address, family=family))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use: set SIDECAR_PORT or --port") from None
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(
            f"cannot listen on {host} port {port} ({reason}): set SIDECAR_HOST/SIDECAR_PORT or --host/--port"
        ) from None
    return sockets


def announce(sockets: list[socket.socket], note: str = "Press CTRL+C to quit") -> None:
    """uvicorn does not announce sockets bound beforehand: we do, as it would."""
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
        _uvicorn_log.info("Uvicorn running on http://%s:%d (%s)", shown, port, note)


def settle_memory() -> None:
    """Once the app is built, before it serves."""
    # Thousands of held watch requests keep ~90 tracked objects each alive for seconds, so
    # CPython's full collections (each walking ~1M objects: a 1-3 s pause at 10,000 held
    # requests) came every few seconds. What exists now lives as long as the process:
    # frozen, it is never walked again; and a full collection waits for 100x more young
    # ones than by default (docs/watch.md, "Ten thousand held requests").
    gc.freeze()
    gc.set_threshold(700, 10, 1000)


class _Server(uvicorn.Server):
    """uvicorn on sockets bound beforehand (`announce`)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            announce(sockets or [])

    before_drain: Callable[[], None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn lets running requests finish before the lifespan's shutdown, so held watch
        # requests would end only when their wait does: they are answered first.
        if self.before_drain is not None:
            self.before_drain()
        await super().shutdown(sockets)


def serve(settings: Settings) -> int:
    from session_sidecar.app import create_app

    # Bound before anything starts: a taken port fails here, in one line, instead of after
    # the app's background tasks (index, JWKS) started and must be unwound.
    sockets = listen_sockets(settings.host, settings.port)
    configure_logging(settings.log_level)
    if settings.workers > 1:
        from session_sidecar.workers import serve_workers

        try:
            return serve_workers(settings, sockets)
        finally:
            for sock in sockets:
                sock.close()
    app = create_app(settings)
    server = _Server(uvicorn_config(app, settings))
    server.before_drain = app.state.sidecar.begin_shutdown
    settle_memory()
    # uvicorn re-raises the signal it stopped on once it has drained. SIGTERM is how an
    # orchestrator asks for a normal stop, so after a clean drain the exit status is 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=sockets)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for sock in sockets:
            sock.close()
    return 0 if server.started else 1


def print_config(settings: Settings) -> None:
    """`NAME=value` per variable, secrets hidden: the settings in force, as an env file."""
    shown = settings.redacted()
    for var, field in ENV_VARS.items():
        value = shown[field]
        if field == "development_mode":
            value = "enabled" if value else "disabled"  # the backend's own words
        elif isinstance(value, bool):
            value = str(value).lower()
        print(f"{var}={'' if value is None else value}")
    print(f"# access policy in force: {settings.policy}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-sidecar",
        description=__doc__,
        epilog=textwrap.fill(SETTINGS_HELP),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the service (settings from the environment)"),
        ("demo", "embedded Redis + simulated backend + the service in development mode"),
    ):
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=textwrap.fill(SETTINGS_HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--host", help="listen address (SIDECAR_HOST)")
        sub.add_argument("--port", type=int, help="listen port (SIDECAR_PORT)")
        if name == "serve":
            sub.add_argument("--workers", type=int, help="processes serving the socket (SIDECAR_WORKERS)")
    commands.add_parser(
        "config",
        help="print the settings in force, secrets hidden, as NAME=value lines (exit 2 if invalid)",
    )
    sim = commands.add_parser("simulate", help="write live runs into a Redis, as the backend does")
    sim.add_argument("--redis-url", required=True)
    sim.add_argument("--conversations", type=int, default=6)
    # The simulator stands in for the backend, so it reads the backend's variable.
    sim.add_argument("--stream-prefix", default=os.environ.get("REDIS_STREAM_PREFIX", "chat:stream"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "simulate":
            from session_sidecar.demo import simulate

            configure_logging("info")
            asyncio.run(simulate(args.redis_url, args.conversations, args.stream_prefix))
            return 0
        if args.command == "config":
            print_config(Settings.from_env())
            return 0
        flags = (("host", args.host), ("port", args.port), ("workers", getattr(args, "workers", None)))
        overrides = {k: v for k, v in flags if v is not None}
        if args.command == "demo":
            from session_sidecar.demo import run_demo

            return run_demo(overrides)
        settings = msgspec.structs.replace(Settings.from_env(), **overrides)
        settings.validate()
        return serve(settings)
    except ConfigError as exc:
        print(f"session-sidecar: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
