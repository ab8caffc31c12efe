"""One hub per process: live entries of every followed stream, read by a fixed few
tasks on a fixed few connections, fanned out to every listener (SPEC 8.4).

A listener subscribes at the id of the last entry its client was given; the hub
reads each stream from one cursor and hands every listener the entries after it.
Nothing here waits on a listener: a full buffer closes that listener alone.

A read that brings entries for thousands of listeners does not wake them all at
once: the `Waker` wakes them a slice per turn of the event loop (waker.py).

Key disappearance (expiry, or a stop that deletes the run) does not show in an
`XREAD`: a missing key just never answers. A checker pipelines `EXISTS` every
`GONE_CHECK_S` for the followed streams that were silent that long (a stream that
just delivered an entry plainly exists), and closes the listeners of the missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from session_sidecar.errors import ApiError
from session_sidecar.settings import Settings
from session_sidecar.store.client import RedisClient, redis_timeout_s, within_budget
from session_sidecar.streams.listener import Followed, Listener, Reason
from session_sidecar.streams.readers import BlockingReader, ClusterPoller, Reader
from session_sidecar.streams.waker import Waker
from session_sidecar.streams.wire import ZERO, StreamId, decode_page, parse_id

log = logging.getLogger("session_sidecar.streams")

READERS = 2  # dedicated connections per process (standalone, Sentinel)
LISTENER_BUFFER = 256  # entries a listener may fall behind before it is closed
GONE_CHECK_S = 2.0


class TooManyStreams(ApiError):
    status_code = 503
    message = "Too many open streams"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "2"})


class StreamHub:
    def __init__(self, settings: Settings, client: RedisClient, *, buffer: int = LISTENER_BUFFER):
        self.client = client
        self.buffer = buffer
        self.max_open = settings.max_streams
        self.open = 0  # streamed responses in progress, replays included
        self._timeout_s = redis_timeout_s(settings)
        self._streams: dict[str, Followed] = {}
        self._owner: dict[str, Reader] = {}
        self._readers: list[Reader]
        if isinstance(client, RedisCluster):
            self._readers = [ClusterPoller(self, client)]
        else:
            self._readers = [BlockingReader(self, client) for _ in range(READERS)]
        self._checker: asyncio.Task[None] | None = None
        self._waker = Waker()

    # -- responses -----------------------------------------------------------

    def admit(self) -> None:
        """Count one more streamed response, or refuse it (503) past SIDECAR_MAX_STREAMS."""
        if self.open >= self.max_open:
            raise TooManyStreams()
        self.open += 1

    def release(self) -> None:
        self.open -= 1

    @property
    def followed(self) -> int:
        """Streams with at least one listener."""
        return len(self._streams)

    # -- listeners -----------------------------------------------------------

    def subscribe(self, key: str, after: StreamId, alive_key: str | None = None) -> Listener:
        """Entries of `key` after `after` from now on. Synchronous on purpose: the
        stream's cursor and the new listener are settled in one step, so no read can
        fall between them (see `follow.py` for how a replay hands over)."""
        listener = Listener(key, after, self.buffer, self._waker.soon)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = Followed(key, after, alive_key)
            reader = min(self._readers, key=lambda r: len(r.streams))
            self._owner[key] = reader
            reader.add(stream)
        stream.listeners.add(listener)
        return listener

    def read_past(self, key: str, sid: StreamId) -> bool:
        """Whether the hub has already read entries of `key` after `sid`: those went to the
        listeners present then, and one subscribing now must read them itself."""
        stream = self._streams.get(key)
        return stream is not None and (parse_id(stream.cursor) or ZERO) > sid

    def unsubscribe(self, listener: Listener) -> None:
        listener.stop()
        stream = self._streams.get(listener.key)
        if stream is None:
            return
        stream.listeners.discard(listener)
        if not stream.listeners:
            self._forget(stream)

    def _forget(self, stream: Followed) -> None:
        if self._streams.get(stream.key) is stream:
            del self._streams[stream.key]
            self._owner.pop(stream.key).remove(stream)

    # -- what readers call ---------------------------------------------------

    def deliver(self, stream: Followed, raw_entries: Sequence[Any]) -> None:
        if self._streams.get(stream.key) is not stream:
            return  # left (or left and came back as a new stream) while the read was out
        batch = decode_page(raw_entries)
        if not batch:
            return
        stream.cursor = batch[-1].id
        stream.seen = True
        stream.last_activity = time.monotonic()
        for listener in list(stream.listeners):
            if not listener.push(batch):
                stream.listeners.discard(listener)  # overflowed: closed, the others go on
        if not stream.listeners:
            self._forget(stream)

    def fail(self, streams: Iterable[Followed], reason: Reason) -> None:
        for stream in list(streams):
            if self._streams.get(stream.key) is stream:
                for listener in stream.listeners:
                    listener.close(reason)
                stream.listeners.clear()
                self._forget(stream)

    async def drop_non_streams(self, streams: Iterable[Followed]) -> int:
        """Close the listeners of keys that now hold another type; how many there were."""
        streams = list(streams)
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.type(stream.key)
        types = await within_budget(self._timeout_s, pipe.execute())
        wrong = [s for s, t in zip(streams, types, strict=True) if t not in (b"stream", b"none")]
        for stream in wrong:
            log.warning("followed key %r is no stream any more", stream.key)
        self.fail(wrong, Reason.GONE)
        return len(wrong)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        for reader in self._readers:
            reader.start()
        self._checker = asyncio.create_task(self._check_gone(), name="stream-gone-check")

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
        self.fail(list(self._streams.values()), Reason.SHUTDOWN)
        for reader in self._readers:
            await reader.close()

    async def _check_gone(self) -> None:
        while True:
            await asyncio.sleep(GONE_CHECK_S)
            try:
                await self.check_gone()
            except (ApiError, RedisError) as exc:
                log.debug("gone check skipped: %s", exc)  # the readers report Redis failures

    async def check_gone(self) -> None:
        quiet_since = time.monotonic() - GONE_CHECK_S
        quiet = [s for s in self._streams.values() if s.last_activity < quiet_since]
        if not quiet:
            return
        pipe = self.client.pipeline(transaction=False)
        for stream in quiet:
            pipe.exists(stream.key)
            if not stream.seen and stream.alive_key:
                pipe.exists(stream.alive_key)
        replies = iter(await within_budget(self._timeout_s, pipe.execute()))
        gone = []
        for stream in quiet:
            exists = next(replies)
            status_exists = next(replies) if not stream.seen and stream.alive_key else 0
            if exists:
                stream.seen = True
            elif not status_exists:
                gone.append(stream)
        self.fail(gone, Reason.GONE)
