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

Without notifications (`auto` mode), every request SCANs the whole keyspace: the
index then times one such lookup now and then, and the process is ready only
while it fits in `SCAN_SHARE` of the request budget (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from session_sidecar.ended import EndedRuns
from session_sidecar.notifications import NotificationsOff, sources, usable_events, write_events
from session_sidecar.observability import Metrics
from session_sidecar.settings import Settings
from session_sidecar.store.client import RedisClient, redis_timeout_s
from session_sidecar.store.facts import Found, ScanFinder
from session_sidecar.store.keys import SCAN_COUNT, KeySchema, decode_key
from session_sidecar.topology import PRIMARIES_CHECK_S, PrimariesMoved, primaries_can_move, primaries_moved

log = logging.getLogger("session_sidecar.index")

STREAM, STATUS = 1, 2  # which of a run's keys exist, as bits
# Each server the index follows (each Cluster primary) has a pair of bits of its own, server
# i's shifted by 2i: mid slot migration the target announces a key (`new`) as the source
# drops it (`del`), on two connections, in either order; the key exists while any has it.
STREAMS = (1 << 2048) // 3  # 0b...0101: the STREAM bit of each of up to 1024 servers
# `xadd`/`set` too: on servers without `new` (Redis 6), they are how a new key is heard.
ADD_EVENTS = frozenset({"new", "rename_to", "xadd", "set"})
REMOVE_EVENTS = frozenset({"del", "expired", "rename_from"})


class KeyEvent(NamedTuple):
    """A notification about one of a run's keys, as handed to `on_change` listeners."""

    conversation_id: str
    run_id: str
    event: str  # `new`, `del`, `expired`, ..., and `set`/`xadd` when `follows_writes`
    stream: bool  # the run's stream key (else its status key)


# Called for every event of a run's key, and with None after each (re)seed: what
# happened while no events were heard is unknown, so anything may have changed.
Listener = Callable[[KeyEvent | None], None]

# A SCAN lookup may take this share of SIDECAR_REDIS_TIMEOUT_MS: the rest is for the
# facts read that follows it, a wait for a pooled connection, and jitter.
SCAN_SHARE = 0.5
# Without notifications the flags are re-read this often (one CONFIG GET), so setting
# them takes effect within seconds; the (costly) SCAN is timed every SIDECAR_INDEX_RESYNC_S.
FLAGS_RECHECK_S = 10.0
# Events handled between turns of the event loop during a burst (30,000 key events from a
# bulk write took the loop for over a second in one go).
EVENTS_PER_TURN = 200
# How long `close()` waits for the maintenance task before abandoning it.
CLOSE_TIMEOUT_S = 5.0
# How long an ended subscription waits for its readers (a read waits at most 1 s).
READERS_STOP_S = 3.0
PROBE_CONVERSATION = "sidecar-readiness-probe"  # no such conversation: what a lookup of any id costs
MANAGED_REDIS = (
    "on managed Redis (CONFIG SET refused) set the notify-keyspace-events parameter: "
    "a custom parameter group on AWS ElastiCache and MemoryDB, "
    "`gcloud redis instances update --update-redis-config` on GCP Memorystore, "
    "Advanced settings > Keyspace notifications on Azure Cache for Redis"
)


class Conversation:
    """One conversation's runs: which keys exist, and what is known of those that ended."""

    __slots__ = ("ended", "runs")

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}  # run id -> STREAM|STATUS bits
        # Told of every event of a run's stream. Made afresh with the conversation, so a
        # resync, which replaces every Conversation, drops what a lookup learnt from before it.
        self.ended = EndedRuns()


Entries = dict[str, Conversation]


class LiveIndex:
    def __init__(self, settings: Settings, client: RedisClient, schema: KeySchema, metrics: Metrics):
        self._settings = settings
        self._client = client
        self._schema = schema
        # Computed when scraped, not per event: `size` walks every conversation.
        metrics.index_runs.set_function(lambda: self.size)
        metrics.index_lag.set_function(self.lag_s)
        metrics.index_enabled.set_function(lambda: float(self.in_sync))
        metrics.scan_lookup.set_function(lambda: math.nan if self.scan_s is None else self.scan_s)
        self._entries: Entries = {}
        self._journal: list[tuple[str, str, str, int]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_heard = 0.0
        self.in_sync = False
        self._reconnected = False
        self.disabled_reason: str | None = None  # set when notifications are unusable
        self.seeded = asyncio.Event()
        self._listeners: list[Listener] = []
        # `set` and `xadd` events are followed too (the watch's triggers; notifications.write_events).
        self.follows_writes = False
        self._scan = ScanFinder(client, schema)
        self.scan_s: float | None = None  # one SCAN lookup, timed while notifications are off
        self._scanned_keys = 0
        self._next_timing = 0.0
        self._stopping = asyncio.Event()
        # Set on whatever the subscription loop (`_follow`) acts on: `close`, a reconnect, a
        # reader or SCAN that ended. The loop sleeps on it, woken by nothing else.
        self._wake = asyncio.Event()
        # Moves on when a subscription ends or reconnects: a SCAN begun before must not
        # mark the index in sync, even if its cancellation was lost (see `close`).
        self._generation = 0
        pool = getattr(client, "connection_pool", None)
        db = pool.connection_kwargs.get("db", 0) if pool is not None else 0
        self._channel_prefix = f"__keyevent@{db}__:"
        self._prefixes = (f"{schema.stream_prefix}:".encode(), f"{schema.status_prefix}:".encode())

    # -- queries -------------------------------------------------------------

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def find(self, conversation_id: str) -> Found:
        conversation = self._entries.get(conversation_id)
        if conversation is None:
            return Found(frozenset())
        return Found(frozenset(conversation.runs), conversation.ended)

    @property
    def size(self) -> int:
        return sum(len(conversation.runs) for conversation in self._entries.values())

    def lag_s(self) -> float:
        return time.monotonic() - self._last_heard if self._last_heard else float("inf")

    @property
    def scan_limit_s(self) -> float:
        return redis_timeout_s(self._settings) * SCAN_SHARE

    def not_ready_reason(self) -> str | None:
        """Why requests cannot be answered within the budget yet, or None."""
        if self.in_sync:
            return None
        off = self.disabled_reason
        if off is None:
            # Seeded once: a re-seed after a reconnect is brief (SCAN per request meanwhile).
            return None if self.seeded.is_set() else "live index not seeded yet"
        if self._settings.index_mode == "index":
            return f"live index not seeded yet: {off}"
        if self.scan_s is None:
            return f"timing a SCAN lookup: {off}"
        if self.scan_s <= self.scan_limit_s:
            return None  # auto without notifications: SCAN per request fits the budget
        return (
            f"SCAN per request cannot answer within the budget: one lookup over {self._scanned_keys} keys "
            f"takes {self.scan_s * 1000:.0f} ms, over {self.scan_limit_s * 1000:.0f} ms "
            f"({SCAN_SHARE:.0%} of SIDECAR_REDIS_TIMEOUT_MS); {off}; {MANAGED_REDIS}"
        )

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._maintain(), name="live-index")

    async def close(self) -> None:
        """Stop the maintenance task within CLOSE_TIMEOUT_S, whatever it was doing."""
        self._stopping.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # A cancellation can be lost: on Python 3.11 `asyncio.wait_for`, which redis-py
        # sends every command through, drops one that lands as the write completes. The
        # loops below then stop on `_stopping` at their next turn instead.
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
        if not done:
            log.warning("live index still busy %.0f s after close: abandoned", CLOSE_TIMEOUT_S)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up at once on close."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def _maintain(self) -> None:
        """Subscribe, seed, follow events, resync; on any failure fall back and start over."""
        backoff = 0.1
        while not self._stopping.is_set():
            servers: list[aioredis.Redis] = []
            try:
                servers = await sources(self._client, self._settings)
                try:
                    events = await usable_events(servers, self._settings)
                except NotificationsOff as off:
                    self._disable(str(off))
                    if self._settings.index_mode == "auto" and time.monotonic() >= self._next_timing:
                        await self._time_scan_lookup()
                        self._next_timing = time.monotonic() + self._settings.index_resync_s
                    await self._pause(min(FLAGS_RECHECK_S, self._settings.index_resync_s))
                    continue
                self.disabled_reason = None
                self.scan_s, self._next_timing = None, 0.0  # should they go off again: time at once
                writes = await write_events(servers, self._settings)
                await self._follow(servers, events + tuple(e for e in writes if e not in events))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, (RedisError, OSError)):
                    log.exception("index failed: SCAN per request until re-seeded")
                elif self.in_sync:
                    log.warning("index subscriber lost (%s): SCAN per request until re-seeded", exc)
                if self.in_sync:
                    backoff = 0.1  # it worked until now: retry soon, back off only while nothing does
                self.in_sync = False
                await self._pause(backoff)
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

    async def _time_scan_lookup(self) -> None:
        """Time what every request now does: a SCAN lookup of one conversation (both prefixes)."""
        before = self.scan_s
        started = time.perf_counter()
        await self._scan.run_ids(PROBE_CONVERSATION)
        self.scan_s = time.perf_counter() - started
        self._scanned_keys = await self._client.dbsize()
        slow = self.scan_s > self.scan_limit_s
        if before is not None and slow == (before > self.scan_limit_s):
            return  # logged when it last changed
        if slow:
            log.warning("not ready: %s", self.not_ready_reason())
        else:
            log.info(
                "SCAN per request fits the budget: one lookup over %d keys takes %.0f ms (limit %.0f ms)",
                self._scanned_keys, self.scan_s * 1000, self.scan_limit_s * 1000,
            )  # fmt: skip

    async def _follow(self, servers: list[aioredis.Redis], events: tuple[str, ...]) -> None:
        """A subscriber per server (each Cluster primary), a SCAN beside them, then resyncs."""
        channels = [self._channel_prefix + e for e in events]
        pubsubs = [server.pubsub() for server in servers]
        readers: list[asyncio.Task[None]] = []
        resync: asyncio.Task[None] | None = None
        ended = asyncio.Event()  # this subscription is over, whether its readers saw a cancel or not
        try:
            for pubsub in pubsubs:
                await self._subscribe(pubsub, channels)
            self.follows_writes = "set" in events and "xadd" in events
            readers = [self._spawn(self._read(pubsub, i, ended)) for i, pubsub in enumerate(pubsubs)]
            if primaries_can_move(self._client):
                # A failover moves the primaries: start over on the new ones (topology.py).
                readers.append(self._spawn(self._watch_primaries(servers, pubsubs)))
            resync = self._spawn(self._resync(servers))
            next_resync = time.monotonic() + self._settings.index_resync_s
            while not self._stopping.is_set():
                self._wake.clear()  # before looking: what happens from now on ends the wait below
                for reader in readers:
                    if reader.done():
                        reader.result()  # re-raise what stopped a subscriber: start over
                if self._reconnected:
                    self._reconnected = False
                    resync.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await resync
                    resync = self._spawn(self._resync(servers))
                if resync.done():
                    resync.result()  # re-raise a failed SCAN: start over
                    if time.monotonic() >= next_resync:
                        resync = self._spawn(self._resync(servers))
                        next_resync = time.monotonic() + self._settings.index_resync_s
                # Until one of the above changes, or the next resync is due.
                due = None if not resync.done() else next_resync - time.monotonic()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due):
                        await self._wake.wait()
        finally:
            self.follows_writes = False
            self._generation += 1
            ended.set()
            tasks = [task for task in (*readers, resync) if task is not None]
            for task in tasks:
                task.cancel()  # a SCAN from before a disconnect must not mark us in sync
            if tasks:
                # Before the subscriptions close: `aclose` hands a subscriber's connection back
                # to the pool, where a reader still running (a lost cancellation, see `close`)
                # would read it beside a request, or reconnect and resubscribe it. Such a
                # reader stops on `ended` once its read returns (within a second).
                await asyncio.wait(tasks, timeout=READERS_STOP_S)
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: in a failover several fail at once, one re-raised
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

    async def _read(self, pubsub: PubSub, source: int, ended: asyncio.Event) -> None:
        handled = 0
        while not (self._stopping.is_set() or ended.is_set()):
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            self._last_heard = time.monotonic()  # the connection is alive and read
            if msg is not None:
                self._on_event(msg["channel"], msg["data"], source)
                handled += 1
                if handled % EVENTS_PER_TURN == 0:
                    # A burst is parsed from the connection's buffer without a real wait:
                    # let the requests in between.
                    await asyncio.sleep(0)

    def _spawn(self, work: Coroutine[None, None, None]) -> asyncio.Task[None]:
        """A task of the subscription, whose end wakes its loop."""
        task = asyncio.create_task(work)
        task.add_done_callback(lambda _: self._wake.set())
        return task

    async def _watch_primaries(self, servers: list[aioredis.Redis], pubsubs: list[PubSub]) -> None:
        while not self._stopping.is_set():
            await self._pause(PRIMARIES_CHECK_S)
            moved = await primaries_moved(self._client, servers, pubsubs)
            if moved is not None:
                raise PrimariesMoved(moved)

    async def _on_reconnect(self, connection: object) -> None:
        log.warning("index subscriber reconnected: SCAN per request until re-seeded")
        self.in_sync = False
        self._reconnected = True
        self._wake.set()
        self._generation += 1

    # -- events and scans ----------------------------------------------------

    def _on_event(self, channel: bytes, key: bytes, source: int) -> None:
        if not key.startswith(self._prefixes):
            return  # the vast majority: keys that are not ours
        text = decode_key(key)
        if text is None or (parsed := self._schema.parse(text)) is None:
            return
        event = channel.decode().removeprefix(self._channel_prefix)
        conversation, run_id = parsed
        stream = text.startswith(self._schema.stream_prefix + ":")
        bit = (STREAM if stream else STATUS) << 2 * source
        if self._journal is not None:
            self._journal.append((event, conversation, run_id, bit))
        _apply(self._entries, event, conversation, run_id, bit)
        for listener in self._listeners:
            listener(KeyEvent(conversation, run_id, event, stream))

    async def _resync(self, servers: list[aioredis.Redis]) -> None:
        """One full SCAN of both prefixes on every server, then replay what happened meanwhile, then swap."""
        generation = self._generation
        journal: list[tuple[str, str, str, int]] = []
        self._journal = journal
        try:
            fresh: Entries = {}
            kinds = tuple(zip(self._schema.match_patterns(), (STREAM, STATUS), strict=True))
            for (pattern, kind), (source, server) in itertools.product(kinds, enumerate(servers)):
                async for raw in server.scan_iter(match=pattern, count=SCAN_COUNT):
                    key = decode_key(raw)
                    parsed = self._schema.parse(key) if key is not None else None
                    if parsed is not None:
                        _apply(fresh, "new", parsed[0], parsed[1], kind << 2 * source)
            for replayed, (event, conversation, run_id, bit) in enumerate(journal, 1):
                _apply(fresh, event, conversation, run_id, bit)
                if replayed % EVENTS_PER_TURN == 0:
                    await asyncio.sleep(0)  # events that arrive meanwhile are appended: replayed too
        finally:
            if self._journal is journal:
                self._journal = None
        if generation != self._generation:
            return
        self._entries = fresh
        self._last_heard = time.monotonic()
        self.in_sync = True
        self.seeded.set()
        log.info("index synced: %d runs", self.size)
        for listener in self._listeners:
            listener(None)


def _apply(entries: Entries, event: str, conversation_id: str, run_id: str, bit: int) -> None:
    conversation = entries.get(conversation_id)
    if event in ADD_EVENTS:
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
    if bit & STREAMS:
        conversation.ended.changed(run_id)


class IndexedFinder:
    """The index while it is in sync; a per-request SCAN otherwise, so answers stay right."""

    def __init__(self, index: LiveIndex, fallback: ScanFinder):
        self.index = index
        self.fallback = fallback

    async def find(self, conversation_id: str) -> Found:
        if self.index.in_sync:
            return self.index.find(conversation_id)
        return await self.fallback.find(conversation_id)
