"""All Redis access: the key schema, the client, run discovery and the facts read.

Read-only by design: nothing here writes the backend's keys. Every call runs
inside a per-request budget (`within_budget()`), which turns timeouts and connection
failures into `Unavailable` (503), never into "no session".
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.cluster import LoadBalancingStrategy
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from session_sidecar.derive import KNOWN_STATUSES, RunFacts
from session_sidecar.errors import Unavailable
from session_sidecar.problems import warn_once
from session_sidecar.settings import Settings

log = logging.getLogger("session_sidecar.store")

STATUS_PREFIX = "task:status"
# `{stream prefix}:reservation:{conversation}:{run}` strings reserve a run id before its
# stream exists (SPEC section 1). They are not runs, and `reservation` is no conversation.
RESERVATION = "reservation"
SCAN_COUNT = 1000
MAX_CONNECTIONS = 64
# Facts read per pipelined round trip: runs (5 commands each), or known ended runs (one
# XLEN each). One trip of 500 commands keeps the event loop for a few milliseconds.
RUNS_PER_TRIP = 100
XLENS_PER_TRIP = 500
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


def create_client(settings: Settings, *, replicas: bool = False) -> RedisClient:
    """One pooled client for the process, standalone, Sentinel or Cluster.

    `replicas`: the second client of SIDECAR_READ_FROM_REPLICAS, for the facts each request
    reads: its reads go to replicas, round robin (a shard or a Sentinel master without a
    replica up is read on its primary). Everything that follows changes as they happen (the
    index, the hub, the watch) keeps the primary's client: what it hears of a change must
    not be read back from a replica that has not seen the change yet.
    """
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


class Found(msgspec.Struct, frozen=True):
    """A conversation's run ids, with the facts of runs that ended when they are known."""

    run_ids: frozenset[str]
    ended: dict[str, RunFacts] = msgspec.field(default_factory=dict)
    # Hand back to `remember_ended`, which keeps no fact that changed since; 0: a finder that
    # keeps no facts (a SCAN).
    epoch: int = 0


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
    """Every run's facts, pipelined: first/last entry, length, status, PTTL.

    `known` holds facts of runs that ended: each costs one XLEN instead, and is
    read again only if its stream's length moved (something was appended or trimmed).
    A usual conversation takes one round trip; one with thousands of runs takes a trip
    per `RUNS_PER_TRIP` runs, so that redis-py's packing and parsing of one trip never
    holds the event loop for long: other requests are served between trips.
    """
    ordered = sorted(run_ids)
    kept = sorted(known or ())
    trips = max(-(-len(ordered) // RUNS_PER_TRIP), -(-len(kept) // XLENS_PER_TRIP))
    facts: list[RunFacts] = []
    changed: list[str] = []
    for trip in range(trips):
        runs = ordered[trip * RUNS_PER_TRIP : (trip + 1) * RUNS_PER_TRIP]
        lengths_of = kept[trip * XLENS_PER_TRIP : (trip + 1) * XLENS_PER_TRIP]
        pipe = client.pipeline(transaction=False)
        for run_id in runs:
            stream = schema.stream_key(conversation_id, run_id)
            status = schema.status_key(conversation_id, run_id)
            pipe.xrange(stream, "-", "+", count=1)
            pipe.xrevrange(stream, "+", "-", count=1)
            pipe.xlen(stream)
            pipe.get(status)
            pipe.pttl(status)
        for run_id in lengths_of:
            pipe.xlen(schema.stream_key(conversation_id, run_id))
        replies = await execute(pipe)
        for i, run_id in enumerate(runs):
            facts.append(_facts(conversation_id, run_id, replies[5 * i : 5 * i + 5]))
        for run_id, length in zip(lengths_of, replies[5 * len(runs) :], strict=True):
            assert known is not None
            if length == known[run_id].stream_length:
                facts.append(known[run_id])
            else:
                changed.append(run_id)
    if changed:
        facts.extend(await read_facts(client, schema, conversation_id, changed))
    return facts


async def execute(pipe: Pipeline | ClusterPipeline) -> list[Any]:
    """A pipeline's replies, errors about a key (WRONGTYPE, no such key) among them as
    exceptions; any other error is raised, a refusal as `Refused`.

    Only a plain error reply says something about the key. The others say the read failed:
    CLUSTERDOWN and TRYAGAIN mid-failover, a redirect left over mid-migration, a replica's
    MASTERDOWN, a lost connection. Taken for "no such key", they would make a run vanish,
    answered 404 or with another run, where the truth is a 503.

    redis-py keeps each error's traceback, whose frames hold the whole reply list: a
    reference cycle that keeps every reply, 10 MB values included, until the cyclic
    garbage collector runs. Dropping the tracebacks frees the replies with the list.
    """
    replies: list[Any] = await pipe.execute(raise_on_error=False)
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


def _facts(conversation_id: str, run_id: str, replies: list[Any]) -> RunFacts:
    first, last, length, status, pttl = replies
    first_id, first_type = _entry(first, conversation_id, run_id)
    last_id, last_type = _entry(last, conversation_id, run_id)
    return RunFacts(
        run_id=run_id,
        first_entry_id=first_id,
        first_entry_type=first_type,
        last_entry_id=last_id,
        last_entry_type=last_type,
        status=_status(status, conversation_id, run_id),
        status_pttl_ms=pttl if isinstance(pttl, int) and pttl >= 0 else None,
        stream_length=length if isinstance(length, int) else 0,
    )


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
