"""`session-sidecar serve | demo | simulate`: fill the settings, then run.

Bad configuration exits with status 2 and one line saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence

import msgspec
import uvicorn

from session_sidecar import __version__
from session_sidecar.errors import ConfigError
from session_sidecar.observability import configure_logging
from session_sidecar.settings import Settings


def uvicorn_config(app: object, settings: Settings) -> uvicorn.Config:
    has = importlib.util.find_spec
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        loop="uvloop" if has("uvloop") else "asyncio",
        http="httptools" if has("httptools") else "h11",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        # SIGTERM: stop accepting, let in-flight requests finish, but not forever.
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )


def serve(settings: Settings) -> int:
    from session_sidecar.app import create_app

    configure_logging(settings.log_level)
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    # uvicorn re-raises the signal it stopped on once it has drained. SIGTERM is how an
    # orchestrator asks for a normal stop, so after a clean drain the exit status is 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="session-sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the service (settings from the environment)"),
        ("demo", "embedded Redis + simulated backend + the service in development mode"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--host", help="listen address (SIDECAR_HOST)")
        sub.add_argument("--port", type=int, help="listen port (SIDECAR_PORT)")
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
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
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
