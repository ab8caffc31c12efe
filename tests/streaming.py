"""Helpers for the streamed endpoints: the sidecar on a real port (uvicorn in a thread,
configured as `serve` configures it), and readers for both wire formats."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn

from session_sidecar.app import Sidecar, create_app
from session_sidecar.cli import uvicorn_config
from session_sidecar.settings import Settings
from tests.conftest import auth


@dataclass
class Served:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    sidecar: Sidecar
    settings: Settings

    def path(self, conversation: str, tail: str) -> str:
        return f"{self.url}{self.settings.api_prefix}/conversations/{conversation}/{tail}"

    def stop(self, timeout_s: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


@contextlib.contextmanager
def serve(settings: Settings) -> Iterator[Served]:
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the sidecar did not start")
        time.sleep(0.02)
    served = Served(f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread, app.state.sidecar, settings)
    try:
        yield served
    finally:
        served.stop()
        sock.close()


def http_client() -> httpx.AsyncClient:
    # Reads may wait long on purpose (a live run); a test bounds itself with its own timeout.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    return httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=limits)


@contextlib.asynccontextmanager
async def open_resume(
    http: httpx.AsyncClient,
    served: Served,
    conversation: str,
    run_id: str,
    cursor: str | None = None,
    user: str | None = "alice",
) -> AsyncIterator[httpx.Response]:
    params = {} if cursor is None else {"cursor": cursor}
    headers = auth(user) if user else {}
    url = served.path(conversation, f"resume/{run_id}")
    async with http.stream("POST", url, params=params, headers=headers) as response:
        yield response


async def resume_body(
    http: httpx.AsyncClient, served: Served, conversation: str, run_id: str, cursor: str | None = None
) -> bytes:
    async with open_resume(http, served, conversation, run_id, cursor) as response:
        assert response.status_code == 200, await response.aread()
        return await response.aread()


@contextlib.asynccontextmanager
async def open_events(
    http: httpx.AsyncClient,
    served: Served,
    conversation: str,
    *,
    user: str = "alice",
    last_event_id: str | None = None,
    **params: str,
) -> AsyncIterator[httpx.Response]:
    headers = auth(user)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    url = served.path(conversation, "events")
    async with http.stream("GET", url, params=params, headers=headers) as response:
        yield response


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Blocks of `field: value` lines (comments as `comment`), as an EventSource reads them."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        event: dict[str, Any] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                event["comment"] = line[1:].strip()
            else:
                name, _, value = line.partition(": ")
                assert name not in event, f"field {name!r} twice in {block!r}"
                event[name] = value
        events.append(event)
    return events


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Each complete event as it arrives."""
    buffer = ""
    async for text in response.aiter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            yield event_of(block)


def event_of(block: str) -> dict[str, Any]:
    parsed = parse_sse(block + "\n\n")
    assert len(parsed) == 1, block
    return parsed[0]
