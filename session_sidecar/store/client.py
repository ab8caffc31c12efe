"""The Redis client, the per-request budget every call runs in, and how a failed reply is told
apart from a reply about a key.

`within_budget()` turns timeouts and connection failures into `Unavailable` (503), never into
"no session".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.cluster import LoadBalancingStrategy
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from session_sidecar.errors import Unavailable
from session_sidecar.settings import Settings

# One logger for all of the store: operators filter and tests count on this name.
log = logging.getLogger("session_sidecar.store")

MAX_CONNECTIONS = 64

RedisClient = aioredis.Redis | RedisCluster
T = TypeVar("T")


def redis_timeout_s(settings: Settings) -> float:
    """SIDECAR_REDIS_TIMEOUT_MS in seconds: each request's budget, and every socket timeout."""
    return settings.redis_timeout_ms / 1000


# What follows changes as they happen (the index's subscribers, the hub, the watch) speaks
# RESP2. In RESP3, redis-py 8's default, every key event is a push frame, which redis-py
# passes through its push-notification handlers (among them a logger looked up and the
# message formatted for a debug line, each time): 77 µs of CPU per event against 59 µs
# in RESP2 (`python -m bench.pubsub`, medians of 5 rounds at 3,000 events/s), and the
# index hears one event per `XADD`: 3,300 a second at 5,000 followers on 500 runs. The
# replies read raw are read in either protocol (streams/readers.py, store/facts.py). The
# requests' budgeted client keeps redis-py's default; behind Sentinel, where one client
# serves both (app.py), requests speak RESP2 too.
FOLLOWING_PROTOCOL = 2


def create_client(settings: Settings, *, replicas: bool = False, budgeted: bool = False) -> RedisClient:
    """One pooled client for the process, standalone, Sentinel or Cluster.

    `replicas`: the second client of SIDECAR_READ_FROM_REPLICAS, for the facts each request
    reads: its reads go to replicas, round robin (a shard or a Sentinel master without a
    replica up is read on its primary). Everything that follows changes as they happen (the
    index, the hub, the watch) keeps the primary's client: what it hears of a change must
    not be read back from a replica that has not seen the change yet.

    `budgeted`: every call made with this client runs under `within_budget` (the requests'
    reads), whose deadline already bounds it and cancels it, so the client has no socket
    timeout and no wait-for-a-connection timeout of its own. Each costs redis-py an
    `asyncio.wait_for` task per command sent and a timer per reply read: about a tenth of
    a request's CPU under load (docs/operations.md, "The request path"). Whatever runs
    outside a budget (the index's subscriptions and seed SCAN, the hub's reads) uses a
    client with timeouts.
    """
    timeout_s = redis_timeout_s(settings)
    common: dict[str, Any] = {
        "socket_timeout": None if budgeted else timeout_s,
        "socket_connect_timeout": timeout_s,
        "decode_responses": False,
        "health_check_interval": 30,
        # One quick retry absorbs a dropped pooled connection; the budget bounds it.
        "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
    }
    if not budgeted:
        common["protocol"] = FOLLOWING_PROTOCOL
    if settings.redis_sentinels:
        sentinels = []
        for node in settings.redis_sentinels.split(","):
            host, _, port = node.strip().rpartition(":")
            sentinels.append((host, int(port)))
        assert settings.redis_sentinel_master is not None
        sentinel = Sentinel(sentinels, socket_timeout=timeout_s)  # type: ignore[no-untyped-call]
        if replicas:
            replica: aioredis.Redis = sentinel.slave_for(settings.redis_sentinel_master, **common)
            return replica
        client: aioredis.Redis = sentinel.master_for(settings.redis_sentinel_master, **common)
        return client
    if settings.redis_cluster:
        common.pop("health_check_interval")
        # A MOVED moves that slot in redis-py's map (a failover's too: the replica becomes the
        # primary). By default every 5th one also closes every connection to rebuild the map,
        # under the requests in flight, which then fail in redis-py itself (a 500, not a 503):
        # a slot migration answers hundreds of MOVED. Failures still rebuild it.
        common["reinitialize_steps"] = 0
        if replicas:
            common["load_balancing_strategy"] = LoadBalancingStrategy.ROUND_ROBIN_REPLICAS
        return RedisCluster.from_url(settings.redis_url, **common)
    # A burst beyond the pool waits for a free connection (within the budget)
    # instead of failing at once, as the plain pool does.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=MAX_CONNECTIONS,
        timeout=None if budgeted else timeout_s,
        **common,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it


async def within_budget(timeout_s: float, work: Awaitable[T]) -> T:
    """All Redis work of one request: its result within `timeout_s`, or a 503 at the deadline.

    The work runs as its own task so the answer never waits for its clean-up:
    a command cancelled mid-read makes redis-py drop and close that connection,
    which under load can take longer than the budget itself.
    """
    # What `asyncio.wait({task}, timeout=...)` does, without its sets and checks: one future
    # woken by the task's end or by the deadline, whichever comes first (per request, hot).
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    woken: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    deadline = loop.call_later(timeout_s, wake)
    task.add_done_callback(wake)
    try:
        await woken
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        deadline.cancel()
        task.remove_done_callback(wake)
    if not task.done():
        task.cancel()
        task.add_done_callback(_discard_outcome)
        log.warning("redis over budget (%.0f ms)", timeout_s * 1000)
        raise Unavailable("Session store too slow", reason="redis_timeout")
    try:
        return task.result()
    except RedisError as exc:
        log.warning("redis unavailable: %s", type(exc).__name__)
        raise Unavailable("Session store unavailable", reason="redis_error") from None
    except (RuntimeError, AttributeError):
        # redis-py's own connection state can break while a failover closes connections
        # under requests in flight ("read() called while another coroutine is already
        # waiting", a writer gone mid-connect): no answer from Redis, so a 503; logged in
        # full, as it would be one of ours too.
        log.exception("redis client failed")
        raise Unavailable("Session store unavailable", reason="redis_error") from None


def _discard_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log "never retrieved"


async def execute(pipe: Pipeline | ClusterPipeline) -> list[Any]:
    """A pipeline's replies, errors about a key (WRONGTYPE, no such key) among them as
    exceptions; any other error is raised, a refusal as `Refused`.

    Only a plain error reply says something about the key. The others say the read failed:
    CLUSTERDOWN and TRYAGAIN mid-failover, a redirect left over mid-migration, a replica's
    MASTERDOWN, a lost connection. Taken for "no such key", they would make a run vanish,
    answered 404 or with another run, where the truth is a 503.
    """
    return _checked(await pipe.execute(raise_on_error=False))


class Batch:
    """Commands sent in one round trip, their replies in order as `execute` gives them.

    On a Cluster, a redis-py pipeline, which sends each command to its key's node. On one
    server (standalone or Sentinel), the commands go straight down one pooled connection with
    redis-py's own packing, parsing and retry: its `Pipeline` adds bookkeeping and a task of
    its own per call (the shielded release of its connection), about a tenth of a
    request's instructions under load (docs/operations.md, "The request path"). No reply callback is
    lost: redis-py has none for the commands read so (raw `XINFO STREAM`, `GET`, `PTTL`).
    """

    def __init__(self, client: RedisClient):
        # `aioredis.Redis` first: a plain class, where RedisCluster's isinstance check goes
        # through typing's Protocol machinery.
        self._client = client if isinstance(client, aioredis.Redis) else None
        self._pipe = None if self._client is not None else client.pipeline(transaction=False)
        self._commands: list[tuple[Any, ...]] = []

    def add(self, *args: Any, **options: Any) -> None:
        """A command; `options` (e.g. `target_nodes`) count on a Cluster only."""
        if self._pipe is not None:
            self._pipe.execute_command(*args, **options)
        else:
            self._commands.append(args)

    async def execute(self) -> list[Any]:
        if self._pipe is not None:
            return await execute(self._pipe)
        assert self._client is not None
        pool, commands = self._client.connection_pool, self._commands
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped upstream
        try:
            # A pooled connection Redis dropped meanwhile is reconnected and the whole trip
            # sent again, once, as redis-py's pipeline does.
            replies = await connection.retry.call_with_retry(
                lambda: _exchange(connection, commands), lambda _error: connection.disconnect()
            )
        finally:
            # A cancelled read already closed the connection (redis-py does on any failure
            # mid-reply): released closed, it is never reused with a reply still unread.
            await pool.release(connection)
        return _checked(replies)


async def _exchange(connection: AbstractConnection, commands: list[tuple[Any, ...]]) -> list[Any]:
    await connection.send_packed_command(connection.pack_commands(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except ResponseError as error:  # about this command alone: the next replies follow
            replies.append(error)
    return replies


def _checked(replies: list[Any]) -> list[Any]:
    """`execute`'s rule on replies. redis-py keeps each error's traceback, whose frames hold
    the whole reply list: a reference cycle that keeps every reply, 10 MB values included,
    until the cyclic garbage collector runs. Dropping the tracebacks frees the replies with
    the list."""
    failed = None
    for reply in replies:
        if isinstance(reply, BaseException):
            reply.__traceback__ = None
            if type(reply) is not ResponseError:
                failed = failed or reply
    if isinstance(failed, ResponseError):
        raise Refused(str(failed)) from failed
    if failed is not None:
        raise failed
    return replies


class Refused(RedisConnectionError):
    """Redis refused a read for a reason of its own, not the key's (CLUSTERDOWN, TRYAGAIN,
    MASTERDOWN, ...). A connection error, so that every caller treats it as one: a 503,
    a hub reader that reconnects, never the "not a stream" of a WRONGTYPE."""
