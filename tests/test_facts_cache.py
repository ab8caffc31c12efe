"""The facts read and what is kept of it: ended runs checked by length and last entry id,
nothing kept of runs that have not ended, odd streams read alike over RESP2 and RESP3, glob
characters in the stream prefix, a PTTL of 0, and the run id breaking an exact tie between
two runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from session_sidecar.derive import Rules, RunFacts, RunState, RunView, choose_run, derive_run
from session_sidecar.embedded import NOTIFY_FLAGS
from session_sidecar.index import LiveIndex
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.store import facts as facts_read
from session_sidecar.store.client import Batch
from session_sidecar.store.facts import NO_SUCH_KEY, _facts, _remaining_ms, read_facts
from session_sidecar.store.keys import KeySchema
from tests.conftest import Api, open_api
from tests.test_index import index_of, wait_for

CONV = "conv-facts"
STEP_MS = 200  # BackendSimulator.full_run's default step between entries


def kept(index: LiveIndex, conversation: str = CONV) -> set[str]:
    """The runs of `conversation` whose facts the index keeps."""
    found = index.find(conversation)
    return set(found.ended.known(found.run_ids).facts) if found.ended is not None else set()


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
async def unwritten(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> AsyncIterator[Api]:
    """The live index, with no `xadd` events: nothing but the facts read sees an append."""
    await redis_client.config_set("notify-keyspace-events", "Egxn")
    try:
        async for api in open_api(make_settings(index_mode="index", index_resync_s=3600)):
            index = index_of(api)
            await wait_for(lambda: index.in_sync)
            assert not index.follows_writes
            yield api
    finally:
        await redis_client.config_set("notify-keyspace-events", NOTIFY_FLAGS)


# A stream of exactly five entries (queued, start, two chunks, end), then changed without a
# key event the index follows: the length alone, or the last entry alone, would not show it.
async def append_exactly_trimmed(client: aioredis.Redis, key: str) -> None:
    await client.xadd(key, {"type": "usage_report", "usage_json": "{}"}, maxlen=5, approximate=False)


async def trim_without_append(client: aioredis.Redis, key: str) -> None:
    await client.xtrim(key, maxlen=4, approximate=False)


CHANGES: dict[str, Callable[[aioredis.Redis, str], Awaitable[None]]] = {
    "append, exactly trimmed": append_exactly_trimmed,
    "trim alone": trim_without_append,
}


async def five_entry_run(sim: BackendSimulator) -> tuple[str, str]:
    run_id = await sim.full_run(CONV, "alice", "m", chunks=2, start_ms=now_ms() - 60_000)
    key = sim.stream_key(CONV, run_id)
    assert await sim.client.xlen(key) == 5
    return run_id, key


@pytest.mark.parametrize("change", CHANGES)
async def test_a_changed_ended_run_is_read_again_with_the_index(
    unwritten: Api, sim: BackendSimulator, change: str
) -> None:
    index = index_of(unwritten)
    run_id, key = await five_entry_run(sim)
    await wait_for(lambda: index.find(CONV).run_ids == {run_id})
    before = (await unwritten.get(CONV, "active-session")).json()
    assert before["status"] == "completed" and kept(index) == {run_id}

    await CHANGES[change](sim.client, key)
    first: Any = await sim.client.xrange(key, count=1)
    last: Any = await sim.client.xrevrange(key, count=1)
    body = (await unwritten.get(CONV, "active-session")).json()
    assert body["sessionId"] == run_id
    assert body["cursor"] == last[0][0].decode()
    assert body["startedAt"] == int(first[0][0].decode().partition("-")[0]) == before["startedAt"] + STEP_MS


@pytest.mark.parametrize("change", CHANGES)
async def test_read_facts_reads_a_known_run_again_once_its_stream_changed(
    redis_client: aioredis.Redis, sim: BackendSimulator, change: str
) -> None:
    schema = KeySchema("chat:stream")
    run_id, key = await five_entry_run(sim)
    [known] = await read_facts(redis_client, schema, CONV, [run_id])
    [same] = await read_facts(redis_client, schema, CONV, [], {run_id: known})
    assert same is known  # unchanged: the kept facts, not a read

    await CHANGES[change](redis_client, key)
    assert await redis_client.xlen(key) in (4, 5)
    [again] = await read_facts(redis_client, schema, CONV, [], {run_id: known})
    [fresh] = await read_facts(redis_client, schema, CONV, [run_id])
    assert again is not known and again.first_entry_id == fresh.first_entry_id
    assert (again.last_entry_id, again.stream_length) == (fresh.last_entry_id, fresh.stream_length)


async def test_facts_of_a_run_that_has_not_ended_are_never_kept(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    async for api in open_api(make_settings(index_mode="index", index_resync_s=3600)):
        index = index_of(api)
        await wait_for(lambda: index.in_sync)
        run_id = await sim.full_run(CONV, "alice", "m", chunks=1, status=None)  # running
        await wait_for(lambda: index.find(CONV).run_ids == {run_id})
        assert (await api.get(CONV, "active-session")).json()["status"] == "active"
        assert kept(index) == set()
        # Its status alone changes: its stream, all a check of kept facts looks at, does not.
        await redis_client.set(sim.status_key(CONV, run_id), "completed", keepttl=True)
        body = (await api.get(CONV, "active-session")).json()
        assert body["sessionId"] == run_id and body["status"] == "completed"


# -- the facts read: each stream from one XINFO STREAM, as XRANGE, XREVRANGE and XLEN gave it --
# Every odd stream a run can have, read over RESP2 and RESP3: the same facts and the same
# warnings as the three reads it replaced (this test passed against them, unchanged).


def alice(run: str) -> str:
    return f"conversation:alice:{run}"


async def odd_streams(client: aioredis.Redis) -> None:
    def stream(run: str) -> str:
        return f"chat:stream:{CONV}:{alice(run)}"

    await client.xadd(stream("plain"), {"type": "start"}, id="1-1")
    await client.xadd(stream("plain"), {"type": "chunk", "content": "hi"}, id="2-1")
    await client.xadd(stream("plain"), {"type": "end", "status": "completed"}, id="3-1")
    await client.set(f"task:status:{CONV}:{alice('plain')}", "completed")
    twice = ("type", "start", "type", "end")  # a field given twice: no dict of xadd's says it
    await client.execute_command("XADD", stream("twice"), "1-1", *twice)  # type: ignore[no-untyped-call]
    await client.xadd(stream("untyped"), {"note": "type"}, id="1-1")  # a value, not a field
    await client.xadd(stream("binary"), {"type": b"\xc3\x28"}, id="1-1")
    await client.xadd(stream("emptied"), {"type": "start"}, id="1-1")
    await client.xtrim(stream("emptied"), maxlen=0)
    await client.set(stream("string"), "not a stream")
    await client.set(f"task:status:{CONV}:{alice('queued')}", "queued")  # no stream yet


def one_entry(run: str, entry_type: str | None) -> RunFacts:
    return RunFacts(
        run_id=alice(run),
        first_entry_id="1-1",
        first_entry_type=entry_type,
        last_entry_id="1-1",
        last_entry_type=entry_type,
        stream_length=1,
    )


PLAIN = RunFacts(
    run_id=alice("plain"),
    first_entry_id="1-1",
    first_entry_type="start",
    last_entry_id="3-1",
    last_entry_type="end",
    status="completed",
    stream_length=3,
)
ODD_FACTS = [
    one_entry("binary", "<undecodable>"),
    RunFacts(run_id=alice("emptied")),
    PLAIN,
    RunFacts(run_id=alice("queued"), status="queued"),
    RunFacts(run_id=alice("string")),  # a string where the stream belongs: no stream
    one_entry("twice", "end"),  # a field given twice: its last value
    one_entry("untyped", None),
]


@pytest.mark.parametrize("protocol", [2, 3])
async def test_the_facts_of_odd_streams(
    redis_url: str, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, protocol: int
) -> None:
    await odd_streams(redis_client)
    warned: set[object] = set()
    monkeypatch.setattr(facts_read, "warn_once", lambda key, *_: warned.add(key))
    client = aioredis.Redis.from_url(redis_url, protocol=protocol)
    try:
        schema = KeySchema("chat:stream")
        facts = await read_facts(client, schema, CONV, [f.run_id for f in ODD_FACTS])
        assert sorted(facts, key=lambda f: f.run_id) == ODD_FACTS
        # Bad data is warned of (a key of another type, a type not UTF-8); no stream is not.
        assert warned == {("stream", CONV, alice("string")), ("type", CONV, alice("binary"))}
        # A kept run is checked with its XINFO STREAM alone: unchanged, the same facts.
        [same] = await read_facts(client, schema, CONV, [], {PLAIN.run_id: PLAIN})
        assert same is PLAIN
    finally:
        await client.aclose()


# -- glob characters in REDIS_STREAM_PREFIX -------------------------------------------------

PREFIX = "ch*at[1]?"
MATCHED_BY_THE_GLOB = "chXat1Y"  # what `ch*at[1]?` matches, read as a pattern


@pytest.mark.parametrize("mode", ["scan", "index"])
async def test_glob_characters_in_the_stream_prefix(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, mode: str
) -> None:
    ours = BackendSimulator(redis_client, stream_prefix=PREFIX)
    theirs = BackendSimulator(redis_client, stream_prefix=MATCHED_BY_THE_GLOB)
    start = now_ms() - 60_000
    run_id = await ours.full_run(CONV, "alice", "ours", chunks=1, start_ms=start)
    other = await theirs.full_run(CONV, "alice", "theirs", chunks=1, start_ms=start + 10_000)
    # Streams alone, so only a SCAN of the stream prefix finds them: the status prefix is
    # shared, and a status key would make the other run one of ours.
    await redis_client.delete(ours.status_key(CONV, run_id), theirs.status_key(CONV, other))
    # Written before the index starts: its seed SCAN, not an event, must find them.
    async for api in open_api(make_settings(stream_prefix=PREFIX, index_mode=mode, index_resync_s=3600)):
        index = api.app.state.sidecar.index
        if mode == "index":
            assert isinstance(index, LiveIndex)
            await wait_for(lambda: index.in_sync)
            assert index.find(CONV).run_ids == {run_id}
        else:
            assert index is None
        response = await api.get(CONV, "active-session")
        assert response.status_code == 200, response.text
        assert response.json()["sessionId"] == run_id


# -- a status key with PTTL 0 ---------------------------------------------------------------
# Redis answers PTTL 0 for less than a millisecond before the key expires: not something a
# test can make happen on purpose, so the replies of the read are handed in directly.

NOW = 1_704_124_000_000
RULES = Rules(stale_after_ms=600_000, status_ttl_ms=600_000)


@pytest.mark.parametrize(
    ("status", "pttl", "remaining", "started_at"),
    [
        (b"queued", 590_000, 590_000, NOW - 10_000),
        (b"queued", 0, 0, NOW - 600_000),  # about to expire: set a whole TTL ago
        (b"queued", -2, 0, NOW - 600_000),  # read by the GET, expired before the PTTL
        (b"queued", -1, None, NOW),  # no TTL: no date at all
        (None, -2, None, None),  # no status key, no stream: no run
    ],
)
def test_a_status_key_dated_from_its_pttl(
    status: bytes | None, pttl: int, remaining: int | None, started_at: int | None
) -> None:
    facts = _facts(CONV, "r", ResponseError(NO_SUCH_KEY), status)  # no stream
    assert facts.status_pttl_ms is None  # dated by the PTTL trip, as below
    facts = msgspec.structs.replace(facts, status_pttl_ms=_remaining_ms(pttl, facts.status))
    assert facts.status_pttl_ms == remaining
    view = derive_run(facts, NOW, RULES)
    if started_at is None:
        assert view is None
    else:
        assert view is not None and view.state is RunState.WORKING
        assert view.started_at == view.last_activity == started_at


async def test_only_runs_without_stream_entries_have_their_status_ttl_read(
    redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    # Five runs in one read: a queued one with no stream (the older backend's `pending`)
    # between a streaming one and a finished one, and a second queued one last, so a slip in
    # which fact gets which PTTL shows; a run with a stream never has its PTTL read.
    old = BackendSimulator(redis_client, old_backend=True)
    t = now_ms()
    done = await sim.full_run(CONV, "alice", "a-done", chunks=2, start_ms=t - 60_000)
    await sim.start(CONV, "conversation:alice:b-live")
    await old.queue(CONV, "conversation:alice:c-queued")
    await redis_client.pexpire(f"task:status:{CONV}:conversation:alice:c-queued", 500_000)
    await sim.chunk(CONV, "conversation:alice:b-live", "text")
    await old.queue(CONV, "conversation:alice:d-queued")
    await redis_client.persist(f"task:status:{CONV}:conversation:alice:d-queued")
    runs = [done, "conversation:alice:b-live", "conversation:alice:c-queued", "conversation:alice:d-queued"]

    async def pttl_calls() -> int:
        stats = await redis_client.info("commandstats")
        return int(stats.get("cmdstat_pttl", {}).get("calls", 0))

    before = await pttl_calls()
    facts = {f.run_id: f for f in await read_facts(redis_client, KeySchema("chat:stream"), CONV, runs)}
    assert await pttl_calls() - before == 2  # one each for c and d, in one trip
    assert facts[done].status_pttl_ms is None and facts[done].last_entry_type == "end"
    assert facts["conversation:alice:b-live"].status_pttl_ms is None
    assert facts["conversation:alice:b-live"].last_entry_type == "chunk"
    queued = facts["conversation:alice:c-queued"]
    assert queued.status == "pending" and queued.last_entry_id is None
    assert queued.status_pttl_ms is not None and 490_000 < queued.status_pttl_ms <= 500_000
    assert facts["conversation:alice:d-queued"].status_pttl_ms is None  # no TTL: no date


def test_derive_dates_a_run_from_a_pttl_of_zero() -> None:
    view = derive_run(RunFacts(run_id="r", status="queued", status_pttl_ms=0), NOW, RULES)
    assert view is not None and view.started_at == NOW - RULES.status_ttl_ms


# -- the run id breaks an exact tie ---------------------------------------------------------


def test_an_exact_tie_is_broken_by_the_run_id_in_any_order() -> None:
    a, b = (RunView(run_id, RunState.FINISHED, "1-0", NOW - 1000, NOW, NOW) for run_id in ("r-a", "r-b"))
    assert choose_run([a, b]) is b and choose_run([b, a]) is b


async def test_two_runs_ending_in_the_same_millisecond(api: Api, redis_client: aioredis.Redis) -> None:
    # Explicit ids: same first and last millisecond, so only the run id can choose.
    ms = 1_700_000_000_000
    for seq, run_id in enumerate(("conversation:alice:a", "conversation:alice:b")):
        key = f"chat:stream:{CONV}:{run_id}"
        await redis_client.xadd(key, {"type": "start"}, id=f"{ms - 1000}-{seq}")
        await redis_client.xadd(key, {"type": "end", "status": "completed"}, id=f"{ms}-{seq}")
    for endpoint in ("active-session", "task-status"):
        body = (await api.get(CONV, endpoint)).json()
        assert body["sessionId"] == "conversation:alice:b", (endpoint, body)
    body = (await api.get(CONV, "active-session")).json()
    assert body["cursor"] == f"{ms}-1" and body["lastActivity"] == ms


async def test_a_batch_gives_each_reply_in_its_place(redis_client: aioredis.Redis) -> None:
    """The facts read's round trip on one server (`Batch`, without redis-py's Pipeline): an
    error reply stands in its command's place, as an exception without its traceback (which
    would hold the reply list), and the commands after it keep their own replies."""
    await redis_client.set("a-status", "running")
    await redis_client.xadd("a-stream", {"type": "start"})
    batch = Batch(redis_client)
    for command in (("GET", "a-status"), ("XINFO", "STREAM", "a-status"), ("GET", "none"),
                    ("XINFO", "STREAM", "none"), ("XLEN", "a-stream")):  # fmt: skip
        batch.add(*command)
    got, wrong_type, missing, no_stream, length = await batch.execute()
    assert (got, missing, length) == (b"running", None, 1)
    assert isinstance(wrong_type, ResponseError) and str(wrong_type).startswith("WRONGTYPE")
    assert isinstance(no_stream, ResponseError) and str(no_stream) == NO_SUCH_KEY
    assert wrong_type.__traceback__ is None and no_stream.__traceback__ is None


async def test_a_batch_cut_off_mid_reply_leaves_no_reply_for_the_next(redis_url: str) -> None:
    """A batch cancelled while Redis has not answered yet (the request's budget ran out) must
    not give its connection back with a reply still to come: the next batch on the same
    pool would read that reply as its own (seen failing with the replies read from redis-py's
    parser directly, which skips the connection's close on a failure)."""
    client = aioredis.Redis.from_url(redis_url, max_connections=1)
    pauser = aioredis.Redis.from_url(redis_url)
    try:
        await client.set("k1", "first")
        await client.set("k2", "second")
        await pauser.execute_command("CLIENT", "PAUSE", "300", "ALL")  # type: ignore[no-untyped-call]
        slow = Batch(client)
        slow.add("GET", "k1")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow.execute(), 0.1)
        await asyncio.sleep(0.4)  # the pause is over: the cut-off reply, if still due, has come
        after = Batch(client)
        after.add("GET", "k2")
        assert await after.execute() == [b"second"]
    finally:
        await client.aclose()
        await pauser.aclose()
