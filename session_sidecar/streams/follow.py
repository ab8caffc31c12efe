"""Replay a stream from the pool, then follow it through the hub, with no gap and no
duplicate at the hand-over (SPEC 8.1, 8.2, 8.4).

1. Replay: `XRANGE` pages from the normal pool until a short page; L = last id sent.
2. Subscribe to the hub at L. This is synchronous, so the stream's hub cursor C and
   the new listener are settled in one step: every entry the hub reads from now on
   (all of them after C) reaches the listener's buffer.
3. Tail: if C > L, read `XRANGE` after L once more, paged: the hub read those entries
   for other listeners before step 2, and they existed before the subscription, so
   this read returns them. If C <= L (most often: the stream was not followed yet, or
   nothing came since the replay was read), the hub reads everything after L from now
   on, and this round trip is spared.
4. Live: the listener's buffer, minus what is at or before the last id sent (the
   tail and the buffer overlap; the overlap is dropped by id, never sent twice).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from session_sidecar.errors import Unavailable
from session_sidecar.store.client import within_budget
from session_sidecar.streams.hub import StreamHub
from session_sidecar.streams.listener import Closed, Listener, Reason
from session_sidecar.streams.wire import Entry, StreamId, decode_page, format_id, successor

PAGE = 200


async def read_page(hub: StreamHub, key: str, after: StreamId, timeout_s: float) -> list[Entry]:
    """Up to PAGE entries after `after`, from the pool, within the Redis budget."""
    raw = await within_budget(
        timeout_s, hub.client.xrange(key, min=format_id(successor(after)), max="+", count=PAGE)
    )
    return decode_page(raw)


def through_end(batch: list[Entry]) -> list[Entry]:
    """`batch` through its first `end` entry, if it holds one: nothing after it is sent."""
    for i, entry in enumerate(batch):
        if entry.type == "end":
            return batch[: i + 1]
    return batch


def is_end(batch: list[Entry]) -> bool:
    """Whether `batch` (cut by `through_end`) closes the run."""
    return bool(batch) and batch[-1].type == "end"


class Follower:
    """One client's way through a stream: `catch_up` (steps 1-3), then, unless that
    reached the run's `end`, the `listener` (step 4), then `close`.

    The live part is not an async generator: it is the hot path of every delivery,
    written from the waker's turn by the listener's sink (live.py).
    """

    __slots__ = (
        "_after",
        "_alive_key",
        "_check",
        "_hub",
        "_key",
        "_listener",
        "_page",
        "_timeout_s",
        "ended",
    )

    def __init__(
        self,
        hub: StreamHub,
        key: str,
        after: StreamId,
        first_page: list[Entry],
        *,
        timeout_s: float,
        alive_key: str | None = None,
        check: bool = False,
    ):
        """`check`: read the tail (step 3) even when the hub has not read past the replay,
        so that a catch-up that succeeds has heard from Redis (after a failure: is it back?)."""
        self._hub = hub
        self._key = key
        self._after = after
        # The replay's first page, read before the response started; dropped once sent
        # (held for the life of the stream otherwise: up to PAGE entries per client).
        self._page = first_page
        self._timeout_s = timeout_s
        self._alive_key = alive_key
        self._check = check
        self._listener: Listener | None = None
        self.ended = False  # the catch-up reached the run's `end`

    @property
    def after(self) -> StreamId:
        """The last entry id handed out."""
        return self._listener.after if self._listener is not None else self._after

    @property
    def listener(self) -> Listener:
        assert self._listener is not None, "catch_up first"
        return self._listener

    async def catch_up(self) -> AsyncGenerator[list[Entry], None]:
        """Steps 1-3: the replayed pages, then the tail read once subscribed. Raises
        `Closed(Reason.ERROR)` when Redis fails."""
        page, self._page = self._page, []
        try:
            while True:
                if page:
                    yield self._taken(page)
                    if self.ended:
                        return
                if len(page) < PAGE:
                    break
                page = await read_page(self._hub, self._key, self._after, self._timeout_s)
            listener = self._listener = self._hub.subscribe(self._key, self._after, self._alive_key)
            if not (self._check or self._hub.read_past(self._key, listener.after)):
                return
            while True:
                page = await read_page(self._hub, self._key, listener.after, self._timeout_s)
                if page:
                    batch = self._taken(page)
                    listener.after = batch[-1].sid
                    yield batch
                    if self.ended:
                        return
                if len(page) < PAGE:
                    return
        except Unavailable:
            raise Closed(Reason.ERROR) from None

    def close(self) -> None:
        if self._listener is not None:
            self._hub.unsubscribe(self._listener)
            self._after = self._listener.after
            self._listener = None

    def _taken(self, page: list[Entry]) -> list[Entry]:
        batch = through_end(page)
        self.ended = is_end(batch)
        self._after = batch[-1].sid
        return batch
