"""A conversation's runs: finding them with a SCAN, and reading their facts in pipelined trips."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Protocol

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError, SlotNotCoveredError

from session_sidecar.derive import KNOWN_STATUSES, RunFacts
from session_sidecar.ended import EndedRuns, unchanged
from session_sidecar.problems import warn_once
from session_sidecar.store.client import Batch, RedisClient
from session_sidecar.store.keys import SCAN_COUNT, KeySchema, decode_key

# Facts read per pipelined round trip: runs (2 commands each), or runs known to have ended
# (one XINFO STREAM each). One trip of 250 commands keeps the event loop for a few
# milliseconds.
RUNS_PER_TRIP = 100
KNOWN_PER_TRIP = 250

# The error reply of `XINFO STREAM` on a key that does not exist (`ERR no such key` in Redis
# 5 to 8 and Valkey; redis-py drops the `ERR`): no stream yet, or no more. Any other error
# reply (WRONGTYPE) is about bad data, and warned of.
NO_SUCH_KEY = "no such key"


class Found(msgspec.Struct, frozen=True):
    """A conversation's run ids, and what is known of those that ended."""

    run_ids: frozenset[str]
    # None: a finder that keeps no facts (a SCAN).
    ended: EndedRuns | None = None


class RunFinder(Protocol):
    """Finds the run ids a conversation has keys for; the facts are read separately."""

    async def find(self, conversation_id: str) -> Found: ...


class ScanFinder:
    """Per-request `SCAN MATCH` over both prefixes. Costs the whole keyspace: a fallback."""

    def __init__(self, client: RedisClient, schema: KeySchema):
        self._client = client
        self._schema = schema

    async def find(self, conversation_id: str) -> Found:
        return Found(frozenset(await self.run_ids(conversation_id)))

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


async def read_facts(
    client: RedisClient,
    schema: KeySchema,
    conversation_id: str,
    run_ids: Iterable[str],
    known: Mapping[str, RunFacts] | None = None,
) -> list[RunFacts]:
    """Every run's facts, pipelined: its stream's length and edge entries (`XINFO STREAM`)
    and its status (`GET`); for a run with a status but no stream entries (queued), the
    status's remaining TTL (`PTTL`, which dates it) in one more trip. Only such a run needs
    it, and it is rare and brief: read for every run, it was a quarter of the commands.

    `known` holds facts of runs that ended: each costs the `XINFO STREAM` alone, and is
    read again only if its stream changed since (`ended.unchanged`).
    A usual conversation takes one round trip; one with thousands of runs takes a trip
    per `RUNS_PER_TRIP` runs, so that redis-py's packing and parsing of one trip never
    holds the event loop for long: other requests are served between trips.
    """
    ordered = sorted(run_ids)
    kept = sorted(known or ())
    trips = max(-(-len(ordered) // RUNS_PER_TRIP), -(-len(kept) // KNOWN_PER_TRIP))
    # `aioredis.Redis` first: a plain class, where RedisCluster's isinstance check goes
    # through typing's Protocol machinery, measurably on every request.
    replicas = (
        client
        if not isinstance(client, aioredis.Redis)
        and isinstance(client, RedisCluster)
        and client.load_balancing_strategy
        else None
    )
    if replicas is not None:
        # The slot map that names each key's replica is built on first use (and again after
        # a failure closed the client), which a pipeline does only when it runs.
        await replicas.initialize()
    facts: list[RunFacts] = []
    changed: list[str] = []
    undated: list[int] = []  # where in `facts` a queued run waits for its PTTL
    for trip in range(trips):
        runs = ordered[trip * RUNS_PER_TRIP : (trip + 1) * RUNS_PER_TRIP]
        checked = kept[trip * KNOWN_PER_TRIP : (trip + 1) * KNOWN_PER_TRIP]
        batch = Batch(client)
        for run_id in runs:
            _xinfo_stream(batch, schema.stream_key(conversation_id, run_id), replicas)
            batch.add("GET", schema.status_key(conversation_id, run_id))
        for run_id in checked:
            _xinfo_stream(batch, schema.stream_key(conversation_id, run_id), replicas)
        replies = await batch.execute()
        for i, run_id in enumerate(runs):
            fact = _facts(conversation_id, run_id, replies[2 * i], replies[2 * i + 1])
            if fact.status is not None and (fact.first_entry_id is None or fact.last_entry_id is None):
                undated.append(len(facts))
            facts.append(fact)
        for run_id, reply in zip(checked, replies[2 * len(runs) :], strict=True):
            assert known is not None
            # Not a stream (an error reply) is a change too: the re-read tells gone from
            # another type, and warns of the latter.
            info = _stream_info(reply)
            if info is not None and unchanged(known[run_id], info.length, _entry_id(info.last)):
                facts.append(known[run_id])
            else:
                changed.append(run_id)
    if undated:
        await _date_queued(client, schema, conversation_id, facts, undated)
    if changed:
        facts.extend(await read_facts(client, schema, conversation_id, changed))
    return facts


async def _date_queued(
    client: RedisClient, schema: KeySchema, conversation_id: str, facts: list[RunFacts], at: list[int]
) -> None:
    """The status TTL left (`PTTL`) of the queued runs at `facts[i]` for each i in `at`.

    Read a moment after the status: a key that expired in between answers -2, dated as a
    whole TTL ago, like the 0 it would have shown a moment before (`_remaining_ms`)."""
    batch = Batch(client)
    for i in at:
        batch.add("PTTL", schema.status_key(conversation_id, facts[i].run_id))
    for i, pttl in zip(at, await batch.execute(), strict=True):
        remaining = _remaining_ms(pttl, facts[i].status)
        facts[i] = msgspec.structs.replace(facts[i], status_pttl_ms=remaining)


def _xinfo_stream(batch: Batch, key: str, replicas: RedisCluster | None) -> None:
    """Queue `XINFO STREAM key`, unparsed: redis-py's `xinfo_stream` builds dicts of both
    edge entries, which cost about 20 µs a run more than reading the fields wanted here.

    `replicas`: a Cluster client that reads from replicas. redis-py sends a command to a
    replica only if it is on its read list (`READ_COMMANDS`), which XINFO is not: the
    key's replica is named here (a shard without one is read on its primary). A redirect or
    a failure there is retried by redis-py's own routing, as for any command.
    """
    if replicas is None:
        batch.add("XINFO", "STREAM", key)
        return
    try:
        node = replicas.get_node_from_key(key, replica=True)
    except SlotNotCoveredError:
        node = None  # left to redis-py, which refreshes its slot map and retries
    if node is None:
        batch.add("XINFO", "STREAM", key)
    else:
        batch.add("XINFO", "STREAM", key, target_nodes=node)


class StreamInfo(NamedTuple):
    """What the facts take from an `XINFO STREAM` reply."""

    length: int
    first: Any  # the first entry, [id, [field, value, ...]], or None
    last: Any  # the last entry, alike


NO_STREAM = StreamInfo(0, None, None)


def _stream_info(reply: object) -> StreamInfo | None:
    """An `XINFO STREAM` reply's length and edge entries: a map in RESP3, a flat list of
    pairs in RESP2 (Redis 5 to 8 and Valkey all give these three fields). None when the key
    is no stream (an error reply: gone, or another type)."""
    if isinstance(reply, dict):  # RESP3
        length, first, last = reply.get(b"length"), reply.get(b"first-entry"), reply.get(b"last-entry")
    elif isinstance(reply, list):
        # Found by index, in a third of the time a dict of every pair takes: no value is one
        # of these names (the values are numbers, entry ids and entries).
        at = reply.index
        try:
            length, first, last = (
                reply[at(b"length") + 1],
                reply[at(b"first-entry") + 1],
                reply[at(b"last-entry") + 1],
            )
        except ValueError:
            return None
    else:
        return None
    return StreamInfo(length, first, last) if isinstance(length, int) else None


def _facts(conversation_id: str, run_id: str, stream: Any, status: Any) -> RunFacts:
    """A run's facts from its `XINFO STREAM` and `GET` replies; `status_pttl_ms` is left to
    `_date_queued`, for the runs that need it."""
    info = _stream(stream, conversation_id, run_id)
    first_type = _entry_type(info.first, conversation_id, run_id)
    last_type = _entry_type(info.last, conversation_id, run_id)
    status_text = _status(status, conversation_id, run_id)
    return RunFacts(
        run_id=run_id,
        first_entry_id=_entry_id(info.first),
        first_entry_type=first_type,
        last_entry_id=_entry_id(info.last),
        last_entry_type=last_type,
        status=status_text,
        stream_length=info.length,
    )


def _stream(reply: object, conversation_id: str, run_id: str) -> StreamInfo:
    """A run's stream from its `XINFO STREAM` reply: none when the key does not exist, nor,
    warned of, when it holds another type (WRONGTYPE)."""
    if isinstance(reply, ResponseError):
        if str(reply) != NO_SUCH_KEY:
            warn_once(("stream", conversation_id, run_id), "stream key of run %r: %s", run_id, reply)
        return NO_STREAM
    if isinstance(reply, RedisError):
        raise reply
    return _stream_info(reply) or NO_STREAM


def _remaining_ms(pttl: object, status: str | None) -> int | None:
    """The status key's remaining TTL from its PTTL reply: None for a key without one (-1).

    0 ms left means it was set a whole TTL ago (SPEC section 3 dates a run without a stream
    from it), and so does -2 after a GET that still read the key: it expired in between.
    """
    if isinstance(pttl, int) and pttl >= 0:
        return pttl
    return 0 if pttl == -2 and status is not None else None


def _id(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _entry_id(entry: Any) -> str | None:
    return _id(entry[0]) if entry else None


def _entry_type(entry: Any, conversation_id: str, run_id: str) -> str | None:
    """The `type` field of a stream entry, `[id, [field, value, ...]]`: None without one; of a
    field given twice, the last value (as redis-py's parsing of XRANGE gave)."""
    if not entry:
        return None
    fields = entry[1]
    try:  # the field names from the last one back: every other item from the end
        raw_type = fields[len(fields) - 1 - 2 * fields[-2::-2].index(b"type")]
    except ValueError:
        return None
    try:
        entry_type: str = raw_type.decode()
    except UnicodeDecodeError:
        warn_once(("type", conversation_id, run_id), "run %r: entry type not UTF-8", run_id)
        entry_type = "<undecodable>"
    return entry_type


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
