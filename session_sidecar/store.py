"""All Redis access: the key schema, the client, run discovery and the facts read.

Read-only by design: nothing here writes the backend's keys. Every call runs
inside a per-request budget (`within_budget()`), which turns timeouts and connection
failures into `Unavailable` (503), never into "no session".
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from session_sidecar.derive import KNOWN_STATUSES, RunFacts
from session_sidecar.errors import Unavailable
from session_sidecar.settings import Settings

log = logging.getLogger("session_sidecar.store")

STATUS_PREFIX = "task:status"
# `{stream prefix}:reservation:{conversation}:{run}` strings reserve a run id before its
# stream exists (SPEC section 1). They are not runs, and `reservation` is no conversation.
RESERVATION = "reservation"
SCAN_COUNT = 1000
MAX_CONNECTIONS = 64
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")

RedisClient = aioredis.Redis | RedisCluster
T = TypeVar("T")


def glob_escape(value: str) -> str:
    """Escape `* ? [ ] \\` so a request value matches only itself in SCAN MATCH."""
    return _GLOB_SPECIAL.sub(r"\\\1", value)


class KeySchema:
    """The backend's key names. A conversation id never holds ':', a run id may."""

    def __init__(self, stream_prefix: str):
        self.stream_prefix = stream_prefix
        self.status_prefix = STATUS_PREFIX

    def stream_key(self, conversation_id: str, run_id: str) -> str:
        return f"{self.stream_prefix}:{conversation_id}:{run_id}"

    def status_key(self, conversation_id: str, run_id: str) -> str:
        return f"{self.status_prefix}:{conversation_id}:{run_id}"

    def match_patterns(self, conversation_id: str) -> tuple[str, str]:
        conv = glob_escape(conversation_id)
        return (f"{glob_escape(self.stream_prefix)}:{conv}:*", f"{self.status_prefix}:{conv}:*")

    def parse(self, key: str) -> tuple[str, str] | None:
        """`(conversation_id, run_id)` of a stream or status key, else None.

        The run id is everything after `{prefix}:{conversation}:`, colons included.
        Reservation keys are not runs: None.
        """
        for prefix in (self.stream_prefix, self.status_prefix):
            if key.startswith(prefix) and key[len(prefix) : len(prefix) + 1] == ":":
                conversation, sep, run_id = key[len(prefix) + 1 :].partition(":")
                if sep and conversation and run_id and conversation != RESERVATION:
                    return conversation, run_id
        return None

    @staticmethod
    def may_hold_runs(conversation_id: str) -> bool:
        """False for `reservation`: its "runs" would be other conversations' reservations."""
        return conversation_id != RESERVATION


def create_client(settings: Settings) -> RedisClient:
    """One pooled client for the process, standalone, Sentinel or Cluster."""
    timeout_s = settings.redis_timeout_ms / 1000
    common: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "decode_responses": False,
        "health_check_interval": 30,
        # One quick retry absorbs a dropped pooled connection; the budget bounds it.
        "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
    }
    if settings.redis_sentinels:
        sentinels = []
        for node in settings.redis_sentinels.split(","):
            host, _, port = node.strip().rpartition(":")
            sentinels.append((host, int(port)))
        assert settings.redis_sentinel_master is not None
        sentinel = Sentinel(sentinels, socket_timeout=timeout_s)  # type: ignore[no-untyped-call]
        client: aioredis.Redis = sentinel.master_for(settings.redis_sentinel_master, **common)
        return client
    if settings.redis_cluster:
        common.pop("health_check_interval")
        return RedisCluster.from_url(settings.redis_url, **common)
    # A burst beyond the pool waits for a free connection (within the budget)
    # instead of failing at once, as the plain pool does.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=MAX_CONNECTIONS, timeout=timeout_s, **common
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it


async def within_budget(timeout_s: float, work: Awaitable[T]) -> T:
    """All Redis work of one request: its result within `timeout_s`, or a 503 at the deadline.

    The work runs as its own task so the answer never waits for its clean-up:
    a command cancelled mid-read makes redis-py drop and close that connection,
    which under load can take longer than the budget itself.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_discard_outcome)
        log.warning("redis over budget (%.0f ms)", timeout_s * 1000)
        raise Unavailable("Session store too slow", reason="redis_timeout")
    try:
        return task.result()
    except RedisError as exc:
        log.warning("redis unavailable: %s", type(exc).__name__)
        raise Unavailable("Session store unavailable", reason="redis_error") from None


def _discard_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log "never retrieved"


class Found(msgspec.Struct, frozen=True):
    """A conversation's run ids, with the facts of runs that ended when they are known."""

    run_ids: frozenset[str]
    ended: dict[str, RunFacts] = msgspec.field(default_factory=dict)
    epoch: int = 0  # hand back to `remember_ended`, which ignores it if anything changed since


class RunFinder(Protocol):
    """Finds the run ids a conversation has keys for; the facts are read separately."""

    async def find(self, conversation_id: str) -> Found: ...

    def remember_ended(self, conversation_id: str, facts: list[RunFacts], epoch: int) -> None: ...


class ScanFinder:
    """Per-request `SCAN MATCH` over both prefixes. Costs the whole keyspace: a fallback."""

    def __init__(self, client: RedisClient, schema: KeySchema):
        self._client = client
        self._schema = schema

    async def find(self, conversation_id: str) -> Found:
        return Found(frozenset(await self.run_ids(conversation_id)))

    def remember_ended(self, conversation_id: str, facts: list[RunFacts], epoch: int) -> None:
        return None  # nothing tells a SCAN that a stream changed: read every time

    async def run_ids(self, conversation_id: str) -> set[str]:
        patterns = self._schema.match_patterns(conversation_id)
        found = await asyncio.gather(*(self._scan(p) for p in patterns))
        run_ids: set[str] = set()
        for keys in found:
            for raw in keys:
                key = decode_key(raw)
                parsed = self._schema.parse(key) if key is not None else None
                if parsed is not None and parsed[0] == conversation_id:
                    run_ids.add(parsed[1])
        return run_ids

    async def _scan(self, pattern: str) -> list[bytes]:
        return [key async for key in self._client.scan_iter(match=pattern, count=SCAN_COUNT)]


def decode_key(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode()
    except UnicodeDecodeError:
        warn_once(("key", raw), "skipping a key that is not UTF-8: %r", raw[:80])
        return None


async def read_facts(
    client: RedisClient,
    schema: KeySchema,
    conversation_id: str,
    run_ids: Iterable[str],
    known: Mapping[str, RunFacts] | None = None,
) -> list[RunFacts]:
    """Every run's facts in one pipelined round trip: first/last entry, length, status, PTTL.

    `known` holds facts of runs that ended: each costs one XLEN instead, and is
    read again only if its stream's length moved (something was appended or trimmed).
    """
    ordered = sorted(run_ids)
    kept = sorted(known or ())
    if not ordered and not kept:
        return []
    pipe = client.pipeline(transaction=False)
    for run_id in ordered:
        stream = schema.stream_key(conversation_id, run_id)
        status = schema.status_key(conversation_id, run_id)
        pipe.xrange(stream, "-", "+", count=1)
        pipe.xrevrange(stream, "+", "-", count=1)
        pipe.xlen(stream)
        pipe.get(status)
        pipe.pttl(status)
    for run_id in kept:
        pipe.xlen(schema.stream_key(conversation_id, run_id))
    replies = await pipe.execute(raise_on_error=False)
    facts = []
    for i, run_id in enumerate(ordered):
        first, last, length, status, pttl = replies[5 * i : 5 * i + 5]
        first_id, first_type = _entry(first, conversation_id, run_id)
        last_id, last_type = _entry(last, conversation_id, run_id)
        facts.append(
            RunFacts(
                run_id=run_id,
                first_entry_id=first_id,
                first_entry_type=first_type,
                last_entry_id=last_id,
                last_entry_type=last_type,
                status=_status(status, conversation_id, run_id),
                status_pttl_ms=pttl if isinstance(pttl, int) and pttl >= 0 else None,
                stream_length=length if isinstance(length, int) else 0,
            )
        )
    changed = []
    for run_id, length in zip(kept, replies[5 * len(ordered) :], strict=True):
        assert known is not None
        if length == known[run_id].stream_length:
            facts.append(known[run_id])
        else:
            changed.append(run_id)
    if changed:
        facts.extend(await read_facts(client, schema, conversation_id, changed))
    return facts


def _entry(reply: object, conversation_id: str, run_id: str) -> tuple[str | None, str | None]:
    """(entry id, entry type) of an XRANGE/XREVRANGE COUNT 1 reply."""
    if isinstance(reply, ResponseError):
        warn_once(("stream", conversation_id, run_id), "stream key of run %r: %s", run_id, reply)
        return None, None
    if isinstance(reply, RedisError):
        raise reply
    if not isinstance(reply, list) or not reply:
        return None, None
    entry_id, fields = reply[0]
    raw_type = fields.get(b"type") if isinstance(fields, dict) else None
    entry_type = None
    if raw_type is not None:
        try:
            entry_type = raw_type.decode()
        except UnicodeDecodeError:
            warn_once(("type", conversation_id, run_id), "run %r: entry type not UTF-8", run_id)
            entry_type = "<undecodable>"
    return (entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)), entry_type


def _status(reply: object, conversation_id: str, run_id: str) -> str | None:
    if isinstance(reply, ResponseError):
        warn_once(("status", conversation_id, run_id), "status key of run %r: %s", run_id, reply)
        return None
    if isinstance(reply, RedisError):
        raise reply
    if reply is None:
        return None
    try:
        status = reply.decode() if isinstance(reply, bytes) else str(reply)
    except UnicodeDecodeError:
        status = "<undecodable>"
    if status not in KNOWN_STATUSES:
        warn_once(("unknown-status", status[:64]), "unknown status %r (run %r): idle", status[:64], run_id)
    return status


_warned: OrderedDict[object, None] = OrderedDict()


def warn_once(key: object, message: str, *args: object) -> None:
    """Bad data is polled every 2 s per tab: log each distinct problem once, not per request."""
    if key in _warned:
        return
    _warned[key] = None
    if len(_warned) > 1000:
        _warned.popitem(last=False)
    log.warning(message, *args)
