"""The live part of a streamed body: each batch the hub reads is written from the waker's
turn, while the body's task sleeps (SPEC 8.4: thousands of followers in one process).

Waking a task per delivery (a future, its callback, a step of the task through three
coroutine frames, a new future for the next wait) put each write a turn of the loop
later, and made most of what the garbage collector traced at 5,000 clients (a tenth of
the CPU, in pauses of 10 ms and more; docs/streams.md). So the listener's
`sink` writes instead: it starts the server's `send` by hand, and nearly always that
send completes then and there (uvicorn's waits only when the client's socket is full).
The task wakes only for what needs it: a send that has to wait, the run's `end`, a
keepalive, a close. Everything still goes through ASGI `send`, in order: the sink writes
only while the task waits in `listener.next` with nothing buffered.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Generator
from typing import Any

from starlette.types import Send

from session_sidecar.streams.follow import is_end, through_end
from session_sidecar.streams.listener import Listener
from session_sidecar.streams.response import more
from session_sidecar.streams.wire import Entry

Encode = Callable[[list[Entry]], bytes]


class Rest:
    """The rest of a send that was started by hand and had to wait (the server waits for a
    slow client's socket to drain): awaited by the body's task, as the send itself would
    have been. `waiting_on` is what the send's first step yielded (a future, mostly)."""

    __slots__ = ("_steps", "_waiting_on")

    def __init__(self, steps: Generator[Any, None, None], waiting_on: Any):
        self._steps = steps
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, None, None]:
        # Not `yield from self._steps`: that would step the send once more before what it
        # waits on is done. The task's resumptions and cancellations are passed on as they come.
        waiting_on = self._waiting_on
        while True:
            try:
                yield waiting_on
            except BaseException as exc:  # a cancellation, thrown in by the task
                try:
                    waiting_on = self._steps.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting_on = self._steps.send(None)
                except StopIteration:
                    return


class Sink:
    """Writes a listener's batches from the waker's turn; what it cannot finish there it
    leaves for the body's task: `rest`, `ended`, `error`."""

    __slots__ = ("_encode", "_loop", "_send", "ended", "error", "rest", "written_at")

    def __init__(self, send: Send, encode: Encode):
        self._send = send
        self._encode = encode
        self._loop = asyncio.get_running_loop()
        self.rest: Rest | None = None
        self.ended = False  # the run's `end` was written
        self.error: Exception | None = None  # what the send raised
        self.written_at = self._loop.time()

    def __call__(self, batch: list[Entry]) -> bool:
        """Write `batch`; whether the body's task may sleep on (else it looks at what is left)."""
        batch = through_end(batch)
        self.ended = is_end(batch)
        self.written_at = self._loop.time()
        try:
            steps = self._send(more(self._encode(batch))).__await__()
            waiting_on = steps.send(None)
        except StopIteration:
            return not self.ended
        except Exception as exc:  # never into the waker's turn: the task raises it
            self.error = exc
            return False
        self.rest = Rest(steps, waiting_on)
        return False


async def follow(
    listener: Listener,
    send: Send,
    encode: Encode,
    keepalive: bytes,
    keepalive_s: float | None,
    until: float = math.inf,
) -> None:
    """Write the listener's batches as they come, and `keepalive` after `keepalive_s` of
    silence, until the run's `end` is written or loop time `until`. Raises `Closed` when
    the hub closes the listener (after what it buffered is written)."""
    loop = asyncio.get_running_loop()
    sink = Sink(send, encode)
    listener.sink = sink
    try:
        while True:
            now = loop.time()
            wait_s = until - now
            if keepalive_s is not None:
                wait_s = min(wait_s, sink.written_at + keepalive_s - now)
            batch = await listener.next(None if wait_s == math.inf else max(wait_s, 0.0))
            if batch:  # came while the task was busy: written from here, the same way
                sink(batch)
            if sink.error is not None:
                raise sink.error
            if sink.rest is not None:
                rest, sink.rest = sink.rest, None
                await rest
            if sink.ended:
                return
            now = loop.time()
            if now >= until:
                return
            if keepalive_s is not None and now - sink.written_at >= keepalive_s:
                await send(more(keepalive))
                sink.written_at = loop.time()
    finally:
        listener.sink = None
