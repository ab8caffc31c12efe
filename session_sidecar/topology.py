"""Whether the servers the live index subscribed to are still the primaries.

A failover moves the primary. When the old one dies, its subscriber fails and the index
starts over by itself; but a primary demoted on purpose (`CLUSTER FAILOVER`, `SENTINEL
FAILOVER` before Sentinel reconfigures it) stays up as a replica, and its subscriber goes
on hearing the events it replicates, late, or not at all once it is detached. So the
index asks every `PRIMARIES_CHECK_S` who the primaries are and starts over on a change:
Cluster: `CLUSTER SLOTS` (one command to a node it is connected to anyway); Sentinel: the
primary Sentinel names, asked through the request pool (redis-py's `get_master_address`),
whose connections to a former primary are then dropped too.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from session_sidecar.store.client import RedisClient

log = logging.getLogger("session_sidecar.index")

PRIMARIES_CHECK_S = 1.0

Address = tuple[str, int]


class PrimariesMoved(RedisConnectionError):
    """The index follows servers that are no longer (all) the primaries: subscribe again."""


def primaries_can_move(client: RedisClient) -> bool:
    """Cluster and Sentinel move primaries; a single server is the primary for good."""
    return isinstance(client, RedisCluster) or isinstance(client.connection_pool, SentinelConnectionPool)


async def primaries_moved(
    client: RedisClient, servers: list[aioredis.Redis], pubsubs: list[PubSub]
) -> str | None:
    """What changed, or None while the subscribed servers are the primaries (or no one can
    tell: a Sentinel or node that does not answer is for the subscribers' own errors to show)."""
    try:
        if isinstance(client, RedisCluster):
            return await _cluster_moved(servers)
        pool = client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            return await _sentinel_moved(pool, pubsubs)
    except (RedisError, OSError) as exc:
        log.debug("primaries not checked: %s", exc)
    return None


async def _cluster_moved(servers: list[aioredis.Redis]) -> str | None:
    subscribed = {_address(server) for server in servers}
    for server in servers:
        try:
            slots: Any = await server.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        except (RedisError, OSError):
            continue  # a dead primary: ask another
        asked = _address(server)
        # An empty host means "the address you reached me at" (Redis 7).
        primaries = {(_text(primary[0]) or asked[0], int(primary[1])) for _, _, primary, *_ in slots}
        if primaries != subscribed:
            return f"primaries now {_shown(primaries)}, following {_shown(subscribed)}"
        return None
    return None


async def _sentinel_moved(pool: SentinelConnectionPool, pubsubs: list[PubSub]) -> str | None:
    host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
    named = (_text(host), int(port))
    for pubsub in pubsubs:
        connection = pubsub.connection
        if connection is not None and connection.is_connected:
            following = (_text(connection.host), int(connection.port))
            if following != named:
                # Pooled connections opened before the switch still reach the former primary,
                # which answers reads (without the newest writes) until Sentinel demotes it:
                # drop them, so each reconnects to the server Sentinel names now. Those in use
                # as they come back: closed under a request, they break redis-py's own state.
                await pool.update_active_connections_for_reconnect()
                await pool.disconnect(inuse_connections=False)
                return f"Sentinel names {_shown({named})} as primary, following {_shown({following})}"
    return None


def _address(server: aioredis.Redis) -> Address:
    kwargs = server.connection_pool.connection_kwargs
    return _text(kwargs.get("host", "")), int(kwargs.get("port", 0))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _shown(addresses: set[Address]) -> str:
    return ", ".join(f"{host}:{port}" for host, port in sorted(addresses))
