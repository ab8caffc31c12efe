"""`serve --workers N`: N processes on the one listening socket, under uvicorn's supervisor.

Each worker is a whole sidecar: its own Redis pools, live index, stream hub and watch,
built in its own process from the environment (uvicorn starts workers with `spawn`: no
state of the parent is shared or inherited). The parent binds the sockets first
(`cli.listen_sockets`, so a taken port still fails at once, in one line), then only
supervises: a worker that dies is replaced; SIGTERM goes on to every worker, each drains
as a lone `serve` does, and the parent exits 0 once all have.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Callable
from types import FrameType

from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from session_sidecar.app import create_app
from session_sidecar.cli import announce, settle_memory, uvicorn_config
from session_sidecar.observability import configure_logging
from session_sidecar.settings import Settings

WORKER_APP = "session_sidecar.workers:worker_app"


def serve_workers(settings: Settings, sockets: list[socket.socket]) -> int:
    """Run `settings.workers` workers until SIGTERM or SIGINT; 1 if one could not start."""
    config = uvicorn_config(WORKER_APP, settings, factory=True, workers=settings.workers)
    supervisor = Multiprocess(config, sockets)
    announce(sockets, f"{settings.workers} workers")
    supervisor.run()
    # A worker that fails before serving makes the supervisor stop them all (uvicorn).
    return 1 if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes) else 0


def worker_app() -> Starlette:
    """The app of one worker, built in the worker's process (uvicorn calls this factory)."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    app = create_app(settings)
    _answer_held_first(app)
    settle_memory()
    return app


def _answer_held_first(app: Starlette) -> None:
    """What `cli._Server.before_drain` does in one process. uvicorn's supervisor runs a
    plain uvicorn Server in each worker, whose drain would wait for held watch requests
    until their wait ends; so the signal that starts the drain also answers them. uvicorn
    installs its handlers before the app's lifespan starts: ours run first, then its own."""
    serve_app = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with serve_app(app):
            loop = asyncio.get_running_loop()
            begin = app.state.sidecar.begin_shutdown
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, _chained(loop, begin, signal.getsignal(signum)))
            yield

    app.router.lifespan_context = lifespan


def _chained(
    loop: asyncio.AbstractEventLoop, begin: Callable[[], None], then: object
) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(begin)
        if callable(then):
            then(signum, frame)

    return handler
