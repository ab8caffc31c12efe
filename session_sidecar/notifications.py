"""Keyspace notifications: which flags the index needs, checking (or setting) them,
and the servers to subscribe to (the server itself, or every Cluster primary).

The sidecar never changes a shared server's configuration on its own: it only
appends missing flags when `SIDECAR_REDIS_CONFIG_SET=true`.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from session_sidecar.settings import Settings
from session_sidecar.store.client import FOLLOWING_PROTOCOL, RedisClient, redis_timeout_s

log = logging.getLogger("session_sidecar.index")

# E key-event channels, g generic (del, rename), x expired, n new key (Redis/Valkey 7+).
FLAGS_NEW = "Egxn"
# Servers without `n`: a creation is seen as `xadd` (t) or `set` ($) instead.
FLAGS_LEGACY = "Eg$xt"
# The watch (docs/watch.md) also follows writes to keys that already exist: `set`
# ($: a status change) and `xadd` (t: a stream entry, such as `end`).
FLAGS_WRITES = "$t"
_ALIASES = {"A": "g$lshzxetd"}
# No `evicted` (flag `e`, never asked for: an evicted run stays a candidate, one read too
# many, until the next resync) and no `unlink` (UNLINK publishes `del`): neither would fire.
_FOLLOWED = ("del", "expired", "rename_from", "rename_to")


class NotificationsOff(Exception):
    """Notifications cannot be used; the message says exactly what an operator should do."""


def missing_flags(current: str, wanted: str) -> str:
    have: set[str] = set()
    for ch in current:
        have.update(_ALIASES.get(ch, ch))
    return "".join(ch for ch in wanted if ch not in have)


def events_for(new_keys: bool) -> tuple[str, ...]:
    return (("new",) if new_keys else ("xadd", "set")) + _FOLLOWED


async def sources(client: RedisClient, settings: Settings) -> list[aioredis.Redis]:
    """The servers whose events we need: the one server, or each Cluster primary."""
    if not isinstance(client, RedisCluster):
        return [client]
    await client.initialize()
    # Reload the slot map every time: after a failover we must follow the new primaries.
    await client.nodes_manager.initialize()
    url = urlsplit(settings.redis_url)
    userinfo = url.netloc.rpartition("@")[0]
    nodes = []
    for node in client.get_primaries():
        netloc = f"{userinfo}@{node.host}:{node.port}" if userinfo else f"{node.host}:{node.port}"
        node_url = urlunsplit(url._replace(netloc=netloc, path="/0"))
        timeout_s = redis_timeout_s(settings)
        nodes.append(
            aioredis.Redis.from_url(
                node_url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                protocol=FOLLOWING_PROTOCOL,
            )
        )
    return nodes


async def usable_events(servers: list[aioredis.Redis], settings: Settings) -> tuple[str, ...]:
    """The key events to follow on every server, enabling flags if allowed; else NotificationsOff."""
    flags = []
    for server in servers:
        try:
            reply: Any = await server.config_get("notify-keyspace-events")
        except ResponseError as exc:
            if settings.index_mode == "index":
                log.warning("CONFIG GET refused (%s); trusting SIDECAR_INDEX_MODE=index", exc)
                return events_for(new_keys=True)
            raise NotificationsOff(
                f"CONFIG GET refused ({exc}); cannot tell whether keyspace notifications are on. "
                f"Set notify-keyspace-events to include {FLAGS_NEW!r} (Redis 7+) and "
                "SIDECAR_INDEX_MODE=index, or keep SCAN per request"
            ) from None
        current = reply.get(b"notify-keyspace-events", reply.get("notify-keyspace-events", b""))
        flags.append(current.decode() if isinstance(current, bytes) else str(current))
    for wanted, new_keys in ((FLAGS_NEW, True), (FLAGS_LEGACY, False)):
        if not any(missing_flags(current, wanted) for current in flags):
            return events_for(new_keys)
    if settings.redis_config_set:
        for wanted, new_keys in ((FLAGS_NEW, True), (FLAGS_LEGACY, False)):
            if await _append_flags(servers, flags, wanted):
                return events_for(new_keys)
    current = flags[0]
    raise NotificationsOff(
        f"keyspace notifications are off (notify-keyspace-events={current!r}): "
        f"set them with `CONFIG SET notify-keyspace-events {current + missing_flags(current, FLAGS_NEW)}` "
        f"(Redis 7+; Redis 6: add {missing_flags(current, FLAGS_LEGACY)!r})"
        + (" on every primary" if len(servers) > 1 else "")
        + " or SIDECAR_REDIS_CONFIG_SET=true; using SCAN per request until then"
    )


async def _append_flags(servers: list[aioredis.Redis], flags: list[str], wanted: str) -> bool:
    for server, current in zip(servers, flags, strict=True):
        target = current + missing_flags(current, wanted)
        if target == current:
            continue
        try:
            await server.config_set("notify-keyspace-events", target)
        except ResponseError:
            return False  # e.g. no `n` before Redis 7: the caller tries the legacy set
        log.warning("set notify-keyspace-events %r -> %r (SIDECAR_REDIS_CONFIG_SET)", current, target)
    return True


async def write_events(servers: list[aioredis.Redis], settings: Settings) -> tuple[str, ...]:
    """`("set", "xadd")` when every server publishes them (adding the flags if allowed), else ()."""
    for server in servers:
        try:
            reply: Any = await server.config_get("notify-keyspace-events")
        except ResponseError:
            return ()  # cannot tell: the watch re-reads watched conversations on a timer instead
        current = reply.get(b"notify-keyspace-events", reply.get("notify-keyspace-events", b""))
        current = current.decode() if isinstance(current, bytes) else str(current)
        missing = missing_flags(current, FLAGS_WRITES)
        if not missing:
            continue
        if settings.redis_config_set:
            try:
                await server.config_set("notify-keyspace-events", current + missing)
            except ResponseError:
                pass  # refused (managed Redis): said below
            else:
                log.warning("set notify-keyspace-events %r -> %r (watch)", current, current + missing)
                continue
        log.info("notify-keyspace-events %r lacks %r: watches re-read on a timer", current, missing)
        return ()
    return ("set", "xadd")
