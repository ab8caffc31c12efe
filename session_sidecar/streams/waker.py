"""Waking the listeners the hub pushed entries to: in order, a slice per turn of the event
loop, so that the loop keeps turning however many clients it serves (docs/streams.md)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

# Each turn wakes the listeners waiting / SPREAD_TURNS, within [SLICE_MIN, SLICE_MAX]: a
# burst is spread over a few turns, and a slice grows with the load, so that waking keeps
# up, but never so far that a turn takes more than a few milliseconds (SLICE_MAX
# deliveries take about 5 ms on this machine, so the loop still accepts some 200
# connections a second while it delivers 40,000 pieces).
SLICE_MIN = 32
SLICE_MAX = 256
SPREAD_TURNS = 8


class Wakeable(Protocol):
    def wake(self) -> None: ...


class Waker:
    """Why slices: uvloop's libuv accepts one new connection per turn of the loop (libuv
    1.45: "don't accept() connections in a loop"). With every listener that got an entry
    woken at once, a turn ran thousands of deliveries, a tenth of a second at 5,000
    clients; the loop then accepted ten connections a second, and new clients waited in
    the listen queue for seconds. A slice runs in a few milliseconds, and between two
    slices the loop accepts a connection and reads what the sockets brought (Redis
    replies among it)."""

    def __init__(self) -> None:
        self._waiting: deque[Wakeable] = deque()

    def soon(self, listener: Wakeable) -> None:
        """Wake `listener` in a later turn of the loop, after those already waiting."""
        self._waiting.append(listener)
        if len(self._waiting) == 1:
            asyncio.get_running_loop().call_soon(self._wake_slice)

    def _wake_slice(self) -> None:
        waiting = self._waiting
        for _ in range(min(len(waiting), SLICE_MAX, max(SLICE_MIN, len(waiting) // SPREAD_TURNS))):
            waiting.popleft().wake()
        if waiting:
            asyncio.get_running_loop().call_soon(self._wake_slice)
