"""Waking the listeners the hub pushed entries to: in order, SLICE per turn of the event
loop, so that the loop keeps turning however many clients it serves (docs/streams.md)."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

# Listeners woken per turn. Each costs a delivery, most often written in the slice itself
# (live.py: a write to its socket and some 10 µs of Python): 32 make a turn of under a
# millisecond. Larger slices deliver
# more per turn but make fewer turns, so fewer new connections accepted (see `Waker`): in
# bench/resume.py at 5,000 clients, slices of 128 let a thousand connections pile up in
# the listen queue while clients arrived, and the p99 delay went from about 0.3 s to
# several seconds. A listener waiting for its turn gathers what comes meanwhile and
# writes it in one piece, so waking keeps up with the entries all the same.
SLICE = 32


class Wakeable(Protocol):
    def wake(self) -> None: ...


class Waker:
    """Why slices: uvloop's libuv accepts one new connection per turn of the loop (libuv
    1.45: "don't accept() connections in a loop"). With every listener that got an entry
    woken at once, a turn ran thousands of deliveries, a tenth of a second at 5,000
    clients; the loop then accepted ten connections a second, and new clients waited in
    the listen queue for seconds. Between two slices the loop accepts a connection and
    reads what the sockets brought (Redis replies among it)."""

    def __init__(self) -> None:
        self._waiting: deque[Wakeable] = deque()

    def soon(self, listener: Wakeable) -> None:
        """Wake `listener` in a later turn of the loop, after those already waiting."""
        self._waiting.append(listener)
        if len(self._waiting) == 1:
            asyncio.get_running_loop().call_soon(self._wake_slice)

    def _wake_slice(self) -> None:
        waiting = self._waiting
        for _ in range(min(len(waiting), SLICE)):
            waiting.popleft().wake()
        if waiting:
            asyncio.get_running_loop().call_soon(self._wake_slice)
