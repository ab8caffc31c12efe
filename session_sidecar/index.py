"""A live, per-process index: conversation id -> run ids, kept from keyspace notifications.

Redis publishes key events (`new`, `del`, `expired`, `rename_*`) for every key;
we keep those under the stream and status prefixes. Notifications are
fire-and-forget, so the index is only a *candidate list*: each request still
reads the runs' facts from Redis, so a stale entry costs an extra read, never a
wrong answer. What could be missed is repaired by:

* a re-seed (one incremental SCAN) after every subscriber (re)connect,
* a periodic anti-entropy SCAN every `SIDECAR_INDEX_RESYNC_S`,
* falling back to a per-request SCAN whenever the index is not in sync.

A SCAN runs beside the live subscriber; events that arrive meanwhile are
journaled and replayed onto the scan's result before it replaces the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from session_sidecar.derive import RunFacts
from session_sidecar.notifications import NotificationsOff, sources, usable_events
from session_sidecar.observability import Metrics
from session_sidecar.settings import Settings
from session_sidecar.store import (
    SCAN_COUNT,
    Found,
    KeySchema,
    RedisClient,
    ScanFinder,
    decode_key,
    glob_escape,
)

log = logging.getLogger("session_sidecar.index")

STREAM, STATUS = 1, 2  # which of a run's keys exist, as bits
ADD_EVENTS = frozenset({"new", "rename_to"})
REMOVE_EVENTS = frozenset({"del", "expired", "evicted", "rename_from", "unlink"})



class Conversation:
    """One conversation's runs: which keys exist, and the facts of runs that ended."""

    __slots__ = ("ended", "epoch", "runs")

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}  # run id -> STREAM|STATUS bits
        # Facts of runs whose stream ends with `end`: a stream event for the run drops them.
        self.ended: dict[str, RunFacts] = {}
        self.epoch = next(_epochs)  # moves on every stream event: a read that raced one is not kept


Entries = dict[str, Conversation]
_epochs = itertools.count(1)


class LiveIndex:
    def __init__(self, settings: Settings, client: RedisClient, schema: KeySchema, metrics: Metrics):
        self._settings = settings
        self._client = client
        self._schema = schema
        # Computed when scraped, not per event: `size` walks every conversation.
        metrics.index_runs.set_function(lambda: self.size)
        metrics.index_lag.set_function(self.lag_s)
        self._entries: Entries = {}
        self._journal: list[tuple[str, str, str, int]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_heard = 0.0
        self.in_sync = False
        self._reconnected = False
        self.disabled_reason: str | None = None  # set when notifications are unusable
        self.seeded = asyncio.Event()
        self.resyncs = 0
        pool = getattr(client, "connection_pool", None)
        db = pool.connection_kwargs.get("db", 0) if pool is not None else 0
        self._channel_prefix = f"__keyevent@{db}__:"
        self._prefixes = (f"{schema.stream_prefix}:".encode(), f"{schema.status_prefix}:".encode())

    # -- queries -------------------------------------------------------------

    def run_ids(self, conversation_id: str) -> set[str]:
        conversation = self._entries.get(conversation_id)
        return set(conversation.runs) if conversation else set()

    def find(self, conversation_id: str) -> Found:
        conversation = self._entries.get(conversation_id)
        if conversation is None:
            return Found(frozenset())
        return Found(frozenset(conversation.runs), dict(conversation.ended), conversation.epoch)

    def remember_ended(self, conversation_id: str, facts: list[RunFacts], epoch: int) -> None:
        conversation = self._entries.get(conversation_id)
        if not facts or conversation is None or conversation.epoch != epoch or not self.in_sync:
            return
        for fact in facts:
            if conversation.runs.get(fact.run_id, 0) & STREAM:
                conversation.ended[fact.run_id] = fact

    @property
    def size(self) -> int:
        return sum(len(conversation.runs) for conversation in self._entries.values())

    def lag_s(self) -> float:
        return time.monotonic() - self._last_heard if self._last_heard else float("inf")

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._maintain(), name="live-index")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _maintain(self) -> None:
        """Subscribe, seed, follow events, resync; on any failure fall back and start over."""
        backoff = 0.1
        while True:
            servers: list[aioredis.Redis] = []
            try:
                servers = await sources(self._client, self._settings)
                try:
                    events = await usable_events(servers, self._settings)
                except NotificationsOff as off:
                    self._disable(str(off))
                    await asyncio.sleep(self._settings.index_resync_s)  # re-check the flags later
                    continue
                self.disabled_reason = None
                await self._follow(servers, events)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, (RedisError, OSError)):
                    log.exception("index failed: SCAN per request until re-seeded")
                elif self.in_sync:
                    log.warning("index subscriber lost (%s): SCAN per request until re-seeded", exc)
                self.in_sync = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                for server in servers:
                    if server is not self._client:
                        await server.aclose()

    def _disable(self, reason: str) -> None:
        if reason != self.disabled_reason:
            log.warning("live index off: %s", reason)
        self.disabled_reason = reason
        self.in_sync = False

    async def _follow(self, servers: list[aioredis.Redis], events: tuple[str, ...]) -> None:
        """A subscriber per server (each Cluster primary), a SCAN beside them, then resyncs."""
        channels = [self._channel_prefix + e for e in events]
        pubsubs = [server.pubsub() for server in servers]
        readers: list[asyncio.Task[None]] = []
        resync: asyncio.Task[None] | None = None
        try:
            for pubsub in pubsubs:
                await self._subscribe(pubsub, channels)
            readers = [asyncio.create_task(self._read(pubsub)) for pubsub in pubsubs]
            resync = asyncio.create_task(self._resync())
            next_resync = time.monotonic() + self._settings.index_resync_s
            while True:
                done, _ = await asyncio.wait(readers, timeout=0.2)
                for reader in done:
                    reader.result()  # re-raise what stopped a subscriber: start over
                if self._reconnected:
                    self._reconnected = False
                    resync.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await resync
                    resync = asyncio.create_task(self._resync())
                if resync.done():
                    resync.result()  # re-raise a failed SCAN: start over
                    if time.monotonic() >= next_resync:
                        resync = asyncio.create_task(self._resync())
                        next_resync = time.monotonic() + self._settings.index_resync_s
        finally:
            for task in (*readers, resync):
                if task is not None and not task.done():
                    task.cancel()  # a SCAN from before a disconnect must not mark us in sync
            for pubsub in pubsubs:
                if pubsub.connection is not None:
                    pubsub.connection.deregister_connect_callback(self._on_reconnect)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _subscribe(self, pubsub: PubSub, channels: list[str]) -> None:
        await pubsub.subscribe(*channels)
        # redis-py reconnects and resubscribes silently; what was published in
        # between is lost, so every reconnect must be followed by a re-seed.
        assert pubsub.connection is not None
        pubsub.connection.register_connect_callback(self._on_reconnect)
        # Wait for every confirmation: events published after it reach us, so
        # nothing slips between the subscription and the seed SCAN.
        confirmed = 0
        while confirmed < len(channels):
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None and msg["type"] == "subscribe":
                confirmed += 1

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            self._last_heard = time.monotonic()  # the connection is alive and read
            if msg is not None:
                self._on_event(msg["channel"], msg["data"])

    async def _on_reconnect(self, connection: object) -> None:
        log.warning("index subscriber reconnected: SCAN per request until re-seeded")
        self.in_sync = False
        self._reconnected = True

    # -- events and scans ----------------------------------------------------

    def _on_event(self, channel: bytes, key: bytes) -> None:
        if not key.startswith(self._prefixes):
            return  # the vast majority: keys that are not ours
        event = channel.decode().removeprefix(self._channel_prefix)
        text = decode_key(key)
        parsed = self._schema.parse(text) if text is not None else None
        if parsed is None:
            return
        conversation, run_id = parsed
        bit = STREAM if text is not None and text.startswith(self._schema.stream_prefix + ":") else STATUS
        if self._journal is not None:
            self._journal.append((event, conversation, run_id, bit))
        _apply(self._entries, event, conversation, run_id, bit)

    async def _resync(self) -> None:
        """One full SCAN of both prefixes, then replay what happened meanwhile, then swap."""
        self._journal = []
        try:
            fresh: Entries = {}
            for prefix, bit in ((self._schema.stream_prefix, STREAM), (self._schema.status_prefix, STATUS)):
                async for raw in self._client.scan_iter(match=f"{glob_escape(prefix)}:*", count=SCAN_COUNT):
                    key = decode_key(raw)
                    parsed = self._schema.parse(key) if key is not None else None
                    if parsed is not None:
                        _apply(fresh, "new", parsed[0], parsed[1], bit)
            for event, conversation, run_id, bit in self._journal:
                _apply(fresh, event, conversation, run_id, bit)
        finally:
            self._journal = None
        self._entries = fresh
        self.resyncs += 1
        self._last_heard = time.monotonic()
        self.in_sync = True
        self.seeded.set()
        log.info("index synced: %d runs", self.size)


def _apply(entries: Entries, event: str, conversation_id: str, run_id: str, bit: int) -> None:
    conversation = entries.get(conversation_id)
    # `xadd`/`set` (servers without `new`) also mean "this key exists now".
    if event in ADD_EVENTS or event in ("xadd", "set"):
        if conversation is None:
            conversation = entries[conversation_id] = Conversation()
        conversation.runs[run_id] = conversation.runs.get(run_id, 0) | bit
    elif event in REMOVE_EVENTS:
        if conversation is None or run_id not in conversation.runs:
            return
        left = conversation.runs[run_id] & ~bit
        if left:
            conversation.runs[run_id] = left
        else:
            del conversation.runs[run_id]
            if not conversation.runs:
                del entries[conversation_id]
    else:
        return
    if bit == STREAM:
        conversation.ended.pop(run_id, None)
        conversation.epoch = next(_epochs)


class IndexedFinder:
    """The index while it is in sync; a per-request SCAN otherwise, so answers stay right."""

    def __init__(self, index: LiveIndex, fallback: ScanFinder):
        self.index = index
        self.fallback = fallback

    async def find(self, conversation_id: str) -> Found:
        if self.index.in_sync:
            return self.index.find(conversation_id)
        return await self.fallback.find(conversation_id)

    def remember_ended(self, conversation_id: str, facts: list[RunFacts], epoch: int) -> None:
        self.index.remember_ended(conversation_id, facts, epoch)
