"""The service under uvicorn in a background thread, for tests that drive it with a
synchronous HTTP client (schemathesis, Hypothesis) from the test's own thread."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import msgspec
import uvicorn
from starlette.applications import Starlette

from session_sidecar.app import create_app
from session_sidecar.cli import uvicorn_config
from session_sidecar.embedded import free_port
from session_sidecar.settings import Settings


@contextlib.contextmanager
def serve_in_thread(settings: Settings) -> Iterator[tuple[str, Starlette]]:
    """`(base URL, app)` of the service listening on a free loopback port."""
    settings = msgspec.structs.replace(settings, host="127.0.0.1", port=free_port())
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{settings.port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=15)
