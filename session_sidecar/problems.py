"""Warnings about bad data in Redis (a key of the wrong type, bytes that are not UTF-8, an
unknown status): each distinct problem once, and at most `LIMIT` a minute.

The same bad data is met again and again: on every poll of every tab (each 2 s), and at
every re-seed of the live index. Each distinct problem is logged once while it is
remembered (the last `REMEMBERED`). A burst of distinct problems (10,000 junk keys) would
still write a line each, and writing them held the event loop for seconds: past `LIMIT`
in a window they are only counted, and the count is logged when the window ends.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable

LIMIT = 20
WINDOW_S = 60.0
REMEMBERED = 1000


class Problems:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        limit: int = LIMIT,
        window_s: float = WINDOW_S,
        remembered: int = REMEMBERED,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._log = logger
        self._limit = limit
        self._window_s = window_s
        self._remembered = remembered
        self._clock = clock
        self._seen: OrderedDict[object, None] = OrderedDict()
        self._window_ends = -math.inf
        self._logged = 0  # in the current window
        self.unlogged = 0  # in the current window, past the limit
        self._first_unlogged = ""
        self._flush: asyncio.TimerHandle | None = None

    def warn(self, key: object, message: str, *args: object) -> None:
        """Log `message % args` unless the problem `key` was logged lately or the limit is reached."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return
        self._seen[key] = None
        if len(self._seen) > self._remembered:
            self._seen.popitem(last=False)
        now = self._clock()
        if now >= self._window_ends:
            self.flush()
            self._window_ends = now + self._window_s
        if self._logged < self._limit:
            self._logged += 1
            self._log.warning(message, *args)
            return
        if not self.unlogged:
            self._first_unlogged = message % args
            self._schedule_flush(self._window_ends - now)
        self.unlogged += 1

    def flush(self) -> None:
        """Log how many problems went unlogged in the window, and start a new one."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.unlogged:
            self._log.warning(
                "%d more problems with data in Redis were not logged (at most %d per %g s), the first: %s",
                self.unlogged, self._limit, self._window_s, self._first_unlogged,
            )  # fmt: skip
        self._logged = self.unlogged = 0
        self._window_ends = -math.inf

    def _schedule_flush(self, delay_s: float) -> None:
        # The count is logged when the window ends even if no problem follows. Without a
        # running loop it waits for the next problem.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flush = loop.call_later(delay_s, self.flush)


_problems = Problems(logging.getLogger("session_sidecar.store"))
warn_once = _problems.warn
