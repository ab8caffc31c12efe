"""What the hub keeps per followed stream and per listener: a cursor, and a bounded buffer."""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
from collections.abc import Callable

from session_sidecar.streams.wire import Entry, StreamId, format_id


class Reason(enum.Enum):
    """Why a listener was closed by the hub (an `end` entry is seen by the listener itself)."""

    GONE = "gone"  # the stream key disappeared: expired, or deleted by a stop
    OVERFLOW = "overflow"  # its client read too slowly: its buffer filled up
    SHUTDOWN = "shutdown"
    ERROR = "error"  # Redis failed and did not come back at once


class Closed(Exception):
    def __init__(self, reason: Reason):
        super().__init__(reason.value)
        self.reason = reason


class Listener:
    """One client's share of a followed stream.

    The hub pushes whole batches (one list per stream per read, shared by every
    listener of that stream) without ever waiting: past `limit` buffered entries
    the listener is closed, and its client is the only one to notice.
    """

    __slots__ = (
        "_batches", "_deadline", "_limit", "_loop", "_queued", "_size", "_timer", "_waiter", "_waker",
        "after", "closed", "key", "sink",
    )  # fmt: skip

    def __init__(
        self, key: str, after: StreamId, limit: int, waker: Callable[[Listener], None] | None = None
    ):
        """`waker`: what wakes the listener once a push gave it entries to read (the hub's
        `Waker.soon`); without one, the push wakes it at once."""
        self.key = key
        self.after = after  # the last entry id its client has been given
        self.closed: Reason | None = None
        self._limit = limit
        self._batches: deque[list[Entry]] = deque()
        self._size = 0
        # Set to True by the keepalive timer, to False by a push or a close.
        self._waiter: asyncio.Future[bool] | None = None
        self._deadline = math.inf  # when the current wait times out (loop time)
        self._timer: asyncio.TimerHandle | None = None
        # Looked up once: on Python 3.11 every `get_running_loop()` is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._waker = waker
        self._queued = False  # in the waker's queue: pushes until it is woken need not queue it again
        # Set by a body following live (live.py): it writes what is pushed while the body's
        # task waits in `next`, and says whether that task may sleep on.
        self.sink: Callable[[list[Entry]], bool] | None = None

    def push(self, batch: list[Entry]) -> bool:
        """Buffer a batch; False if that overflowed the buffer (the listener is then closed)."""
        if self.closed is not None:
            return False
        self._size += len(batch)
        if self._size > self._limit:
            self.close(Reason.OVERFLOW)
            return False
        self._batches.append(batch)
        if self._waker is None:
            self.wake()
        elif not self._queued and self._waiter is not None and not self._waiter.done():
            self._queued = True
            self._waker(self)
        return True

    def close(self, reason: Reason) -> None:
        if self.closed is not None:
            return
        self.closed = reason
        if reason is Reason.OVERFLOW:
            # Dropped at once: a client that fell this far behind resumes from its own last id.
            self._batches.clear()
            self._size = 0
        self.wake()

    async def next(self, wait_s: float | None) -> list[Entry]:
        """The entries after `after` buffered so far, waiting up to `wait_s` for one;
        `[]` on timeout, or when the `sink` took what came and needs the task to go on.
        Raises `Closed` once the buffer is drained and the hub closed it.

        The list returned may be the very one the hub pushed to every listener of the
        stream: read it, never change it. (No comprehension in here: one would make a
        closure cell of `self` on every call, one more object for the collector to trace
        per waiting client.)"""
        while True:
            if self._batches:
                fresh = self._take()
                if fresh:
                    return fresh
                continue
            if self.closed is not None:
                raise Closed(self.closed)
            loop = self._loop
            self._waiter = loop.create_future()
            # No timer per wait: entries come far more often than keepalives are due, so one
            # timer stays armed across waits and, when it fires early, re-arms itself at the
            # newest deadline (a timer per wait cost more than the rest of a delivery).
            self._deadline = math.inf if wait_s is None else loop.time() + wait_s
            if wait_s is not None and (self._timer is None or self._timer.when() > self._deadline):
                self.stop()  # a shorter wait than the armed one (an event stream's last)
                self._timer = loop.call_at(self._deadline, self._expire)
            try:
                if await self._waiter:
                    return []
            finally:
                self._waiter = None

    def _take(self) -> list[Entry]:
        batches = self._batches
        # Most often one batch, as pushed: handed on as it is, not copied.
        fresh = batches.popleft() if len(batches) == 1 else [e for b in batches for e in b]
        batches.clear()
        self._size = 0
        after = self.after
        if fresh[0].sid <= after:  # entries come in id order: only a hand-over overlaps
            fresh = [e for e in fresh if e.sid > after]
            if not fresh:
                return fresh
        self.after = fresh[-1].sid
        return fresh

    def stop(self) -> None:
        """Disarm the keepalive timer: the listener is no longer read."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done() or self._deadline == math.inf:
            return  # not waiting with a deadline: the next wait arms a timer of its own
        loop = self._loop
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._expire)
        else:
            self._waiter.set_result(True)

    def wake(self) -> None:
        """Let a waiting `next` read what was pushed (or learn of the close); with a `sink`,
        hand what was pushed to the sink instead, and leave the task waiting."""
        self._queued = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self.sink is not None and self._batches and self.closed is None:
            fresh = self._take()
            if not fresh or self.sink(fresh):
                return
            waiter.set_result(True)  # `next` returns [] and its task sees what the sink left
            return
        waiter.set_result(False)


class Followed:
    """A stream with at least one listener. `cursor` is the last id the hub read from it:
    every entry up to it went to every listener present at the time, nothing after it did."""

    __slots__ = ("alive_key", "cursor", "key", "last_activity", "listeners", "seen")

    def __init__(self, key: str, after: StreamId, alive_key: str | None):
        self.key = key
        self.cursor = format_id(after)
        # A queued run's status key keeps a stream that does not exist yet alive (8.2).
        self.alive_key = alive_key
        self.seen = alive_key is None
        self.listeners: set[Listener] = set()
        self.last_activity = time.monotonic()
