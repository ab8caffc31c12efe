"""The hub's Redis side: the few tasks that read every followed stream.

Standalone and Sentinel: a `BlockingReader` owns one dedicated connection (named
`sidecar-hub`) and loops on `XREAD COUNT n BLOCK ms STREAMS k1 k2 ... id1 id2 ...`
over all of its streams. A stream that joins while that read is blocked must not
wait out the block: the reader's own client id is unblocked (`CLIENT UNBLOCK`)
from a pool connection, and the read is issued again with the new stream in it.
A stream that leaves is dropped at the next round; until then its entries are
read and thrown away, which costs nothing anyone waits for.

A reader starts at most one round every ROUND_S. A round costs the same whatever it
brings back (the command names every stream and its cursor; Redis looks at each),
so without a floor a busy hub would pay that for nearly every entry written: with
500 followed streams written every 150 ms, hundreds of rounds a second, each naming
250 streams. With it, entries that come quicker than that share a round, at the
price of at most ROUND_S of delay.

Cluster: one blocking read cannot span slots, and the backend's keys carry no hash
tag, so every stream sits in a slot of its own. `ClusterPoller` instead sends one
pipelined, non-blocking read (`XRANGE` after its cursor) per followed stream every `CLUSTER_POLL_S`
(at once again while entries keep coming): the cluster client groups them by node,
so each poll costs one pooled connection per primary, whatever the number of streams
or listeners. See docs/streams.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError, ResponseError

from session_sidecar.store.client import execute
from session_sidecar.streams.listener import Followed, Reason
from session_sidecar.streams.wire import ZERO, format_id, parse_id, successor

log = logging.getLogger("session_sidecar.streams")

BLOCK_MS = 1000  # bounds how late a join is when CLIENT UNBLOCK is not permitted (ACL)
COUNT = 256  # entries per stream per read: a backlog is read in a few rounds
HUB_CLIENT_NAME = "sidecar-hub"
NUDGE_RETRY_S = 0.005
CLUSTER_POLL_S = 0.1
ROUND_S = 0.02
CLOSE_RETRY_S = 0.1


class Sink(Protocol):
    """What the hub offers its readers."""

    def deliver(self, stream: Followed, raw_entries: Sequence[Any]) -> None: ...

    def fail(self, streams: Iterable[Followed], reason: Reason) -> None: ...

    async def drop_non_streams(self, streams: Iterable[Followed]) -> int: ...


class Reader:
    """A task that reads the streams assigned to it, and sleeps while it has none."""

    def __init__(self, sink: Sink):
        self._sink = sink
        self.streams: dict[str, Followed] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._round_started = -ROUND_S  # loop time
        # Whether the round in progress reached Redis (a connection made, its handshake
        # answered): a connection lost after that was cut, not refused (see `_run`).
        self._reached = False

    def add(self, stream: Followed) -> None:
        self.streams[stream.key] = stream
        self._wake.set()

    def remove(self, stream: Followed) -> None:
        if self.streams.get(stream.key) is stream:
            del self.streams[stream.key]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=type(self).__name__)

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            # Python 3.11's `asyncio.wait_for` (redis-py sends commands through it) can swallow
            # a cancel that lands as a send completes: the read that follows is cancelled in
            # turn. The connection is closed only once the task has ended: closed under a
            # command still on its way, it failed that command with an AttributeError
            # (redis-py's writer gone), which ended the task with it.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=CLOSE_RETRY_S)
            with contextlib.suppress(asyncio.CancelledError):
                self._task.result()
        await self._lost()

    async def _round(self, snapshot: dict[str, Followed]) -> None:
        raise NotImplementedError

    def _snapshot(self) -> dict[str, Followed]:
        """The streams the next round reads."""
        return dict(self.streams)

    async def _lost(self) -> None:
        """Forget a broken connection; the next round opens a new one."""

    async def _run(self) -> None:
        failures = 0
        while not self._closing:
            if not self.streams:
                self._wake.clear()
                await self._wake.wait()
                continue
            loop = asyncio.get_running_loop()
            if (pause_s := self._round_started + ROUND_S - loop.time()) > 0:
                await asyncio.sleep(pause_s)
            self._round_started = loop.time()
            snapshot = self._snapshot()
            self._reached = False
            try:
                await self._round(snapshot)
                failures = 0
            except ResponseError as exc:
                # One key that is no stream any more (WRONGTYPE) fails the whole read.
                if await self._sink.drop_non_streams(snapshot.values()) == 0:
                    log.warning("hub read refused: %s", exc)
                    self._sink.fail(list(self.streams.values()), Reason.ERROR)
                    await asyncio.sleep(1)
            except (RedisError, OSError) as exc:
                # A killed connection is replaced at once and read again from each
                # stream's cursor: no gap, no duplicate. Only a second failure in a
                # row without reaching Redis in between (Redis really down) ends the
                # responses that depend on it: connections killed one after another
                # (CLIENT KILL, a proxy's idle cut) while Redis answers are not that.
                failures = 1 if self._reached else failures + 1
                await self._lost()
                if self._closing:
                    break
                if failures == 1:
                    log.warning("hub connection lost (%s): reconnecting", type(exc).__name__)
                    continue
                self._sink.fail(list(self.streams.values()), Reason.ERROR)
                await asyncio.sleep(min(0.05 * 2**failures, 5.0))


class BlockingReader(Reader):
    def __init__(self, sink: Sink, pool_client: aioredis.Redis):
        super().__init__(sink)
        self._pool_client = pool_client
        pool = pool_client.connection_pool
        self._connection_class = pool.connection_class
        # Same server, credentials and TLS as the pool; a read timeout that outlasts the block.
        self._kwargs = {
            **pool.connection_kwargs,
            "socket_timeout": BLOCK_MS / 1000 + 5,
            "client_name": HUB_CLIENT_NAME,
        }
        self._conn: AbstractConnection | None = None
        self.client_id: int | None = None
        self._generation = 0  # moves on every join
        self._reading = 0  # the generation whose streams the read in flight covers
        self._in_read = False
        self._nudger: asyncio.Task[None] | None = None
        self._unblock_allowed = True

    def add(self, stream: Followed) -> None:
        super().add(stream)
        self._generation += 1
        self._nudge_if_behind()

    def _snapshot(self) -> dict[str, Followed]:
        self._reading = self._generation
        return super()._snapshot()

    def _nudge_if_behind(self) -> None:
        if self._in_read and self._reading < self._generation and self._nudger is None:
            self._nudger = asyncio.create_task(self._nudge())

    async def close(self) -> None:
        if (nudger := self._nudger) is not None:
            nudger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await nudger
        await super().close()

    async def _connect(self) -> AbstractConnection:
        if self._conn is not None and self._conn.is_connected:
            return self._conn
        conn = self._conn or self._connection_class(**self._kwargs)
        self._conn = conn
        await conn.connect()  # type: ignore[no-untyped-call]
        self._reached = True
        await conn.send_command("CLIENT", "ID")
        self.client_id = int(await conn.read_response())
        return conn

    async def _lost(self) -> None:
        self.client_id = None
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)

    async def _round(self, snapshot: dict[str, Followed]) -> None:
        conn = await self._connect()
        self._reached = True  # a connection made in an earlier round reached Redis then
        streams = snapshot.values()
        command = (
            "XREAD", "COUNT", COUNT, "BLOCK", BLOCK_MS, "STREAMS",
            *[s.key for s in streams], *[s.cursor for s in streams],
        )  # fmt: skip
        self._in_read = True
        self._nudge_if_behind()  # a stream joined while the connection was being made
        try:
            # Packed by hiredis, in C: redis-py's own packer, in Python, took 0.8 ms per
            # round at 250 streams. (hiredis's stub types the tuple as one of length 1.)
            await conn.send_packed_command(hiredis.pack_command(command))  # type: ignore[arg-type]
            reply = await conn.read_response()
        finally:
            self._in_read = False
        if not reply:
            return  # the block timed out, or a join unblocked it
        # RESP3 (redis-py's default protocol) answers a map, RESP2 a list of pairs.
        for raw_key, raw_entries in reply.items() if isinstance(reply, dict) else reply:
            stream = snapshot.get(raw_key.decode())
            if stream is not None:
                self._sink.deliver(stream, raw_entries)

    async def _nudge(self) -> None:
        """Interrupt the blocked read until it covers every stream that joined.

        A reply of 0 means the read was not blocked (yet): still on its way to Redis,
        or already answered. Either way a new read with the new streams follows soon;
        retry briefly until one of them is the case.
        """
        try:
            while self._in_read and self._reading < self._generation and self._unblock_allowed:
                if self.client_id is not None and await self._pool_client.client_unblock(self.client_id):
                    return
                await asyncio.sleep(NUDGE_RETRY_S)
        except ResponseError as exc:  # e.g. NOPERM: joins then wait for the block to time out
            self._unblock_allowed = False
            log.warning("CLIENT UNBLOCK refused (%s): streams join within %d ms instead", exc, BLOCK_MS)
        except RedisError:
            pass  # the block times out on its own
        finally:
            self._nudger = None


class ClusterPoller(Reader):
    def __init__(self, sink: Sink, client: RedisCluster):
        super().__init__(sink)
        self._client = client

    async def _round(self, snapshot: dict[str, Followed]) -> None:
        streams = list(snapshot.values())
        pipe = self._client.pipeline()
        for stream in streams:
            # A non-blocking single-key XREAD, in the form whose reply is the same in RESP2 and 3.
            after = parse_id(stream.cursor) or ZERO
            pipe.xrange(stream.key, min=format_id(successor(after)), max="+", count=COUNT)
        replies = await execute(pipe)
        got, not_streams = False, []
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, ResponseError):
                not_streams.append(stream)
            elif isinstance(reply, Exception):
                raise reply
            elif reply:
                got = True
                self._sink.deliver(stream, reply)
        if not_streams:
            await self._sink.drop_non_streams(not_streams)
        if not got:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLUSTER_POLL_S):
                    await self._wake.wait()  # a join polls at once
