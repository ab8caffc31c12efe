"""The streamed response both endpoints answer with, once their refusals are behind them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from session_sidecar.routes import NO_STORE
from session_sidecar.streams.hub import StreamHub

STREAM_HEADERS = {**NO_STORE, "X-Accel-Buffering": "no"}

# A scope key: the server's own `send`, put there by the app before any middleware
# (app.py). A streamed response sends its body messages there, past every wrapper (the
# observability middleware's, CORS's, Starlette's two error handlers): they act on the
# start message only, and pass body messages on unchanged. A middleware that changes
# bodies would not see them.
BODY_SEND = "sidecar.body_send"

# What writes a body: it sends `more(chunk)` messages, and returns when the body is complete.
Body = Callable[[Send], Coroutine[Any, Any, None]]


def more(chunk: bytes) -> Message:
    """A piece of the body; more follows."""
    return {"type": "http.response.body", "body": chunk, "more_body": True}


class Streamed(Response):
    """A streamed answer that gives its place back however it ends, and ends its body
    properly at shutdown.

    Leaner than Starlette's `StreamingResponse`, whose anyio task group costs memory per
    client: the body runs in the request's own task (its live part mostly written from
    the hub's waker, live.py), and one small task, the disconnect watcher, waits for the
    client to leave (`_watch`).

    The start message goes through every middleware, as any response's. The body messages
    skip the wrappers that act on the start message alone (`BODY_SEND`): thousands of
    clients each get a few pieces a second, and those wrappers were a sixth of the cost of
    every piece."""

    def __init__(self, body: Body, hub: StreamHub):
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers(STREAM_HEADERS)  # no `body` attribute: no Content-Length
        self._body = body
        self._hub = hub
        self._left = False  # the client disconnected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(self._watch(receive, task))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._take_body()(scope.get(BODY_SEND, send))
            watcher.cancel()  # before the end: uvicorn answers `receive` with a disconnect then
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if self._left:
                task.uncancel()  # our own cancellation, done with: nothing to send to anyone
                return
            # uvicorn cancels the requests still running SIDECAR_SHUTDOWN_TIMEOUT_S after a
            # stop began, then cuts their connections mid-body. The body is ended properly
            # instead (8.1: the response ends at shutdown). Not re-raised: nothing awaits
            # this request any more, and uvicorn would log a traceback per open stream.
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self._hub.release()

    def _take_body(self) -> Body:
        """The body, handed over once: what it was built with (up to a page of replayed
        entries) is the running body's alone then, not held here for the life of the stream."""
        body = self._body
        del self._body
        return body

    async def _watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        """The disconnect watcher. uvicorn's `send` returns silently once the client has
        gone, so a body that only writes would never learn of it: an idle stream would
        outlive its client until its next keepalive (15 s), a live one until its run
        ended. `receive` is the one place a disconnect shows: it answers
        `http.disconnect` then, and this cancels the body's task at once."""
        while (await receive())["type"] != "http.disconnect":
            pass  # the request's own body, unread
        self._left = True
        task.cancel()
