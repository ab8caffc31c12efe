"""The live index against a real Redis, with and without new-key events (Redis 6): creation,
deletion, expiry, rename, a killed subscriber, runs written during a seed SCAN, a lost
notification, missing flags; and the same answers as SCAN."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from session_sidecar.app import Sidecar
from session_sidecar.embedded import NOTIFY_FLAGS, EmbeddedRedis
from session_sidecar.index import CLOSE_TIMEOUT_S, KeyEvent, LiveIndex
from session_sidecar.notifications import (
    FLAGS_LEGACY,
    FLAGS_NEW,
    FLAGS_WRITES,
    missing_flags,
    usable_events,
    write_events,
)
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.store.facts import read_facts
from session_sidecar.store.keys import KeySchema
from tests.conftest import Api, open_api

CONV = "conv-idx"


async def wait_for(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


# The flag sets the index works with (notifications.py): Redis/Valkey 7+ with the watch's
# write events (as the sidecar's own servers start), and Redis 6's, without `n`: a new key is
# heard only as the `set` or `xadd` that made it. Every test that hears events runs on both.
FLAG_SETS = {"new-key-events": NOTIFY_FLAGS, "redis6": FLAGS_LEGACY}


@pytest.fixture(params=sorted(FLAG_SETS))
async def flags(request: pytest.FixtureRequest, redis_client: aioredis.Redis) -> AsyncIterator[str]:
    chosen = FLAG_SETS[request.param]
    await redis_client.config_set("notify-keyspace-events", chosen)
    yield chosen
    await redis_client.config_set("notify-keyspace-events", NOTIFY_FLAGS)


@pytest.fixture
async def indexed(make_settings: Callable[..., Settings], flags: str) -> AsyncIterator[Api]:
    async for api in open_api(make_settings(index_mode="index", index_resync_s=3600)):
        await wait_for(lambda: index_of(api).in_sync)
        yield api


def index_of(api: Api) -> LiveIndex:
    index = api.app.state.sidecar.index
    assert isinstance(index, LiveIndex)
    return index


class Seeds:
    """How often the index was (re)seeded since this was made: after each seed its listeners
    hear None (what the watch hears, so that it reads again)."""

    def __init__(self, index: LiveIndex) -> None:
        self.count = 0
        index.on_change(self._heard)

    def _heard(self, event: KeyEvent | None) -> None:
        if event is None:
            self.count += 1


async def test_creation_deletion_and_partial_removal(indexed: Api, sim: BackendSimulator) -> None:
    index = index_of(indexed)
    run_id = await sim.full_run(CONV, "alice", "m", status=None)
    await wait_for(lambda: index.find(CONV).run_ids == {run_id})
    assert (await indexed.get(CONV, "active-session")).json()["sessionId"] == run_id
    metrics = (await indexed.client.get("/metrics")).text
    assert "sidecar_index_runs 1.0" in metrics and "sidecar_index_lag_seconds " in metrics
    assert "sidecar_index_enabled 1.0" in metrics

    await sim.client.delete(sim.stream_key(CONV, run_id))
    await asyncio.sleep(0.1)
    assert index.find(CONV).run_ids == {run_id}  # the status key still names it
    await sim.client.delete(sim.status_key(CONV, run_id))
    await wait_for(lambda: index.find(CONV).run_ids == set())
    assert (await indexed.get(CONV, "active-session")).status_code == 404


async def test_expiry_and_rename(indexed: Api, sim: BackendSimulator) -> None:
    index = index_of(indexed)
    run_id = await sim.full_run(CONV, "alice", "m", status=None)
    await wait_for(lambda: index.find(CONV).run_ids == {run_id})
    await sim.client.pexpire(sim.stream_key(CONV, run_id), 50)
    await sim.client.pexpire(sim.status_key(CONV, run_id), 50)
    await wait_for(lambda: index.find(CONV).run_ids == set())

    other = await sim.full_run(CONV, "alice", "n", status=None)
    await sim.client.rename(sim.stream_key(CONV, other), sim.stream_key("conv-moved", other))
    await sim.client.delete(sim.status_key(CONV, other))
    await wait_for(lambda: index.find(CONV).run_ids == set() and index.find("conv-moved").run_ids == {other})


async def test_unrelated_keys_stay_out(indexed: Api, redis_client: aioredis.Redis) -> None:
    for i in range(50):
        await redis_client.set(f"celery-task-meta-{i}", "x")
        await redis_client.xadd(f"other:stream:{i}", {"a": "b"})
    await redis_client.set("chat:streamer:x:y", "not ours")
    await asyncio.sleep(0.2)
    assert index_of(indexed).size == 0


async def test_killed_subscriber_reseeds(
    indexed: Api, sim: BackendSimulator, redis_client: aioredis.Redis
) -> None:
    index = index_of(indexed)
    seeds = Seeds(index)
    assert await redis_client.client_kill_filter(_type="pubsub") == 1
    # A run written right after the kill: its notification may be lost, the re-seed finds it.
    run_id = await sim.full_run(CONV, "alice", "during-gap", status=None)
    await wait_for(lambda: seeds.count > 0 and index.in_sync, timeout_s=10)
    assert index.find(CONV).run_ids == {run_id}
    assert (await indexed.get(CONV, "active-session")).json()["sessionId"] == run_id
    later = await sim.full_run(CONV, "alice", "after", status=None)
    await wait_for(lambda: later in index.find(CONV).run_ids)


FILLER_KEYS = 200_000  # a seed SCAN of every prefix over them takes a few hundred ms


async def test_runs_written_during_the_seed_scan_are_replayed_onto_it(
    make_settings: Callable[..., Settings],
    redis_url: str,
    redis_client: aioredis.Redis,
    sim: BackendSimulator,
    flags: str,
) -> None:
    # The seed SCANs the stream keys, then the status keys. Streams created and deleted while
    # it scans the status keys were scanned already (or not yet): only their events, journaled
    # and replayed onto the SCAN's result, put the new runs in and take the deleted ones out.
    fill = "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'filler:' .. i, '') end"
    await redis_client.eval(fill, 0, str(FILLER_KEYS))
    run, entry = "conversation:alice:m", {"agent_id": "agent-1", "status": "processing"}
    created, deleted = [f"conv-new-{i}" for i in range(5)], [f"conv-gone-{i}" for i in range(5)]
    for conv in deleted:
        await sim.xadd(conv, run, "start", entry)
    settings = make_settings(index_mode="index", index_resync_s=3600)
    status_keys = KeySchema(settings.stream_prefix).match_patterns()[1]
    monitor_client = aioredis.Redis.from_url(redis_url)
    try:
        async with monitor_client.monitor() as monitor:
            async for api in open_api(settings):
                index = index_of(api)
                heard_in_sync: list[bool] = []

                def heard(event: KeyEvent | None) -> None:
                    if event is not None:
                        heard_in_sync.append(index.in_sync)

                index.on_change(heard)
                async with asyncio.timeout(30):
                    async for command in monitor.listen():
                        if f" MATCH {status_keys} " in command["command"]:  # `SCAN {cursor} MATCH ...`
                            break
                for conv in created:
                    await sim.xadd(conv, run, "start", entry)
                for conv in deleted:
                    await redis_client.delete(sim.stream_key(conv, run))
                await wait_for(lambda: index.in_sync, timeout_s=30)
                # Every event came before the SCAN's result replaced the index.
                assert len(heard_in_sync) >= len(created) + len(deleted) and not any(heard_in_sync)
                for conv in created:
                    assert (await api.get(conv, "active-session")).json().get("sessionId") == run, conv
                metrics = (await api.client.get("/metrics")).text
                assert f"sidecar_index_runs {len(created)}.0" in metrics  # the deleted ones are out
    finally:
        await monitor_client.aclose()
        await redis_client.flushdb()


async def test_lost_notification_repaired_by_anti_entropy(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, sim: BackendSimulator, flags: str
) -> None:
    async for api in open_api(make_settings(index_mode="index", index_resync_s=1)):
        index = index_of(api)
        await wait_for(lambda: index.in_sync)
        await redis_client.config_set("notify-keyspace-events", "")
        try:
            run_id = await sim.full_run(CONV, "alice", "silent", status=None)
        finally:
            await redis_client.config_set("notify-keyspace-events", flags)
        assert index.find(CONV).run_ids == set()  # never notified
        await wait_for(lambda: index.find(CONV).run_ids == {run_id}, timeout_s=5)
        assert (await api.get(CONV, "active-session")).json()["sessionId"] == run_id


async def test_missing_flags_auto_falls_back_to_scan_and_says_which(
    make_settings: Callable[..., Settings],
    redis_client: aioredis.Redis,
    sim: BackendSimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await redis_client.config_set("notify-keyspace-events", "Kl")
    try:
        run_id = await sim.full_run(CONV, "alice", "m", status=None)
        with caplog.at_level(logging.WARNING, logger="session_sidecar.index"):
            async for api in open_api(make_settings(index_mode="auto")):
                index = index_of(api)
                await wait_for(lambda: index.scan_s is not None)  # ready once SCAN is timed
                assert "CONFIG SET notify-keyspace-events lKEgxn" in caplog.text
                assert (await api.client.get("/readyz")).status_code == 200
                assert "sidecar_index_enabled 0.0" in (await api.client.get("/metrics")).text
                assert (await api.get(CONV, "active-session")).json()["sessionId"] == run_id
        assert (await redis_client.config_get("notify-keyspace-events"))["notify-keyspace-events"] == "lK"
    finally:
        await redis_client.config_set("notify-keyspace-events", "Eg$xtn")


async def test_missing_flags_added_only_when_allowed_keeping_existing(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    await redis_client.config_set("notify-keyspace-events", "Kl")
    try:
        async for api in open_api(make_settings(index_mode="auto", redis_config_set=True)):
            await wait_for(lambda: index_of(api).in_sync)
            flags: Any = await redis_client.config_get("notify-keyspace-events")
            assert set(flags["notify-keyspace-events"]) >= set("KlEgxn")
    finally:
        await redis_client.config_set("notify-keyspace-events", "Eg$xtn")


async def test_index_mode_without_flags_is_not_ready(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    await redis_client.config_set("notify-keyspace-events", "")
    try:
        async for api in open_api(make_settings(index_mode="index")):
            await wait_for(lambda: index_of(api).disabled_reason is not None)
            readyz = await api.client.get("/readyz")
            assert readyz.status_code == 503
            reason = readyz.json()["reason"]
            assert (
                reason.startswith("live index not seeded yet: ") and "notify-keyspace-events Egxn" in reason
            )
    finally:
        await redis_client.config_set("notify-keyspace-events", "Eg$xtn")


async def test_not_ready_until_seeded(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    sidecar = Sidecar(make_settings(index_mode="index"))
    try:
        assert await sidecar.not_ready_reason() == "live index not seeded yet"
        await sidecar.start()
        assert sidecar.index is not None
        await asyncio.wait_for(sidecar.index.seeded.wait(), 5)
        assert await sidecar.not_ready_reason() is None
    finally:
        await sidecar.close()


async def test_close_stops_the_index_wherever_it_is(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    # Closed at every step of its start-up in turn: a cancellation that lands as redis-py
    # finishes sending a command is lost on Python 3.11 (its `asyncio.wait_for`), and the
    # index then ran on forever, so `serve` never exited (issue 9).
    settings = make_settings(index_mode="index", index_resync_s=3600)
    for steps in range(40):
        sidecar = Sidecar(settings)
        await sidecar.start()
        assert sidecar.index is not None
        task = sidecar.index._task
        assert task is not None
        for _ in range(steps):
            await asyncio.sleep(0)
        closing = asyncio.ensure_future(sidecar.close())
        done, _ = await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_S + 5)
        assert done and task.done(), f"index still running after close, {steps} steps in"


def kept(index: LiveIndex) -> set[str]:
    """The runs of CONV whose facts the index keeps."""
    found = index.find(CONV)
    return set(found.ended.known(found.run_ids).facts) if found.ended is not None else set()


async def test_ended_runs_are_read_once_until_their_stream_changes(
    indexed: Api, sim: BackendSimulator, redis_client: aioredis.Redis
) -> None:
    index = index_of(indexed)
    start = int(time.time() * 1000) - 60_000
    ended = await sim.full_run(CONV, "alice", "m", chunks=1, start_ms=start)
    await wait_for(lambda: index.find(CONV).run_ids == {ended})
    assert (await indexed.get(CONV, "active-session")).json()["status"] == "completed"
    assert kept(index) == {ended}
    before = await _status_reads(redis_client)
    body = (await indexed.get(CONV, "active-session")).json()
    assert body["sessionId"] == ended and body["status"] == "completed"
    assert await _status_reads(redis_client) == before  # served from the cache

    # The stream is deleted and written again under the same id: the cache must not answer.
    await redis_client.delete(sim.stream_key(CONV, ended))
    await sim.start(CONV, ended)
    await wait_for(lambda: not kept(index))
    body = (await indexed.get(CONV, "active-session")).json()
    assert body["status"] == "active" and body["startedAt"] > start


async def test_an_entry_appended_after_end_is_seen(indexed: Api, sim: BackendSimulator) -> None:
    # No key event reports an append to an existing stream; the cached run's XINFO STREAM does.
    index = index_of(indexed)
    ended = await sim.full_run(CONV, "alice", "m", chunks=1)
    await wait_for(lambda: index.find(CONV).run_ids == {ended})
    await indexed.get(CONV, "active-session")
    assert kept(index) == {ended}
    later = await sim.xadd(CONV, ended, "usage_report", {"usage_json": "{}"})
    body = (await indexed.get(CONV, "active-session")).json()
    assert body["cursor"] == later and body["status"] == "completed"  # finished by its status


async def test_a_read_that_raced_a_stream_event_is_not_kept(indexed: Api, sim: BackendSimulator) -> None:
    index = index_of(indexed)
    ended = await sim.full_run(CONV, "alice", "m", chunks=1)
    await wait_for(lambda: index.find(CONV).run_ids == {ended})
    found = index.find(CONV)
    assert found.ended is not None
    memory, began = found.ended, found.ended.known(()).since
    facts = await read_facts(sim.client, KeySchema("chat:stream"), CONV, [ended])
    # A stream event of that run in between (one of another run alone would spoil nothing:
    # test_large_reads.py).
    await sim.client.xadd(sim.stream_key(CONV, ended), {"type": "chunk", "content": "late"})
    await wait_for(lambda: memory.known(()).since != began)
    memory.remember(facts, began)
    assert kept(index) == set()
    memory.remember(facts, memory.known(()).since)
    assert kept(index) == {ended}


async def _status_reads(client: aioredis.Redis) -> int:
    """The status's GET and PTTL: the check of kept facts is the XINFO STREAM of a full read
    without them."""
    stats: Any = await client.info("commandstats")
    return int(sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("get", "pttl")))


@pytest.mark.parametrize("flag_set", [FLAGS_NEW, FLAGS_NEW + FLAGS_WRITES, FLAGS_LEGACY])
async def test_every_channel_followed_is_heard(flag_set: str, make_settings: Callable[..., Settings]) -> None:
    # A channel that never fires under the flags the index asks for is dead code: `evicted`
    # is under `e`, which it never asks for (an evicted run is a candidate that costs a read
    # until the next resync), and UNLINK publishes `del`, not `unlink`.
    with EmbeddedRedis(notify_flags=flag_set) as server:
        client = aioredis.Redis.from_url(server.url)
        settings = make_settings(redis_url=server.url, index_mode="index")
        followed = set(await usable_events([client], settings)) | set(await write_events([client], settings))
        pubsub = client.pubsub()
        await pubsub.psubscribe("__keyevent@0__:*")
        assert (await pubsub.get_message(timeout=5) or {}).get("type") == "psubscribe"  # from now on, heard
        # Every way a key comes and goes, the backend's and an operator's.
        await client.set("status", "running")
        await client.set("status", "completed")
        await client.xadd("stream", {"type": "start"})
        await client.xadd("stream", {"type": "end"})
        await client.rename("stream", "renamed")
        await client.delete("status")
        await client.unlink("renamed")
        await client.set("short", "x", px=1)
        await asyncio.sleep(0.01)
        assert not await client.exists("short")  # expired, on this read if not before
        await client.config_set("maxmemory-policy", "allkeys-random")
        used: Any = await client.info("memory")
        await client.config_set("maxmemory", used["used_memory"] + 200_000)
        for i in range(100):
            await client.set(f"filler-{i}", "x" * 10_000)
        assert (await client.info("stats"))["evicted_keys"] > 0
        await client.config_set("maxmemory", 0)
        await client.set("last", "x")
        await client.delete("last")
        heard: set[str] = set()
        async with asyncio.timeout(10):
            while True:
                message = await pubsub.get_message(timeout=1)
                if message is not None:
                    heard.add(event := message["channel"].decode().removeprefix("__keyevent@0__:"))
                    if (event, message["data"]) == ("del", b"last"):
                        break  # events come in order: every one before it was heard
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
    assert followed <= heard, f"never heard under {flag_set!r}: {sorted(followed - heard)}"


def test_missing_flags() -> None:
    assert missing_flags("", "Egxn") == "Egxn"
    assert missing_flags("AE", "Egxn") == "n"  # A = g$lshzxetd, without n
    assert missing_flags("gxE$tn", "Egxn") == ""


# -- index and SCAN give the same answers over generated histories ----------------

USERS = ("alice", "bob")
CONVS = ("c-1", "c-2", "c-3")
MAX_N, MAX_MINUTES_AGO = 3, 30
STEP_MS = 200  # between a generated run's entries
# How close to turning idle (SIDECAR_STALE_AFTER_S) a generated run may be when the answers are
# compared: within seconds of the history's start, even on a loaded machine.
CLEAR_OF_STALE_MS = 20_000
op = st.tuples(
    st.sampled_from(("run", "run", "end", "cancel-old", "del-stream", "del-status", "expire")),
    st.sampled_from(CONVS),
    st.sampled_from(USERS),
    st.integers(min_value=0, max_value=MAX_N),  # chunks, or which earlier run
    st.integers(min_value=0, max_value=MAX_MINUTES_AGO),
)


def _start_ms(now_ms: int, minutes_ago: int) -> int:
    # Half a minute off the whole minutes. The stale limit is a whole number of them (600 s),
    # so a run started 10 minutes ago, its last entry 0.2-0.8 s later, turned idle that long
    # into the example: on a loaded machine, between the indexed and the scanned request of
    # its conversation, which then answered `active` and `idle` (2 failures in 17 full runs).
    return now_ms - minutes_ago * 60_000 - 30_000


def test_generated_runs_stay_clear_of_the_stale_boundary(make_settings: Callable[..., Settings]) -> None:
    stale_ms = make_settings().stale_after_s * 1000
    for minutes_ago in range(MAX_MINUTES_AGO + 1):
        for chunks in range(MAX_N + 1):
            # Its last entry: `start`, then the chunks, one step apart. Its age, `now` being 0:
            age = -(_start_ms(0, minutes_ago) + (chunks + 1) * STEP_MS)
            assert abs(age - stale_ms) >= CLEAR_OF_STALE_MS, (minutes_ago, chunks)


async def _apply_history(
    sim: BackendSimulator, old: BackendSimulator, ops: list[tuple[str, str, str, int, int]], poll: Api
) -> None:
    now = int(time.time() * 1000)
    runs: list[tuple[str, str]] = []
    for i, (kind, conv, user, n, ago) in enumerate(ops):
        await poll.get(conv, "active-session", user=user)  # fills the ended-run cache mid-history
        start = _start_ms(now, ago)
        if kind == "run":
            run = await sim.full_run(
                conv, user, f"m{n}", chunks=n, status=None, start_ms=start, step_ms=STEP_MS
            )
            runs.append((conv, run))
        elif not runs:
            continue
        elif kind == "end":
            # Dated after every generated entry, not now: a run whose stream is gone is dated by
            # its status key's TTL at the request's clock, which a busy event loop moves on by
            # milliseconds: an `end` written just after its status could then win one request
            # and lose the other.
            ended_ms = _start_ms(now, 0) + (MAX_N + 2 + i) * STEP_MS
            await sim.end(*runs[n % len(runs)], "completed", at_ms=ended_ms)
        elif kind == "cancel-old":
            runs.append(
                (conv, await old.full_run(conv, user, f"o{n}", chunks=1, status="cancelled", start_ms=start))
            )
        elif kind == "del-stream":
            await sim.client.delete(sim.stream_key(*runs[n % len(runs)]))
        elif kind == "del-status":
            await sim.client.delete(sim.status_key(*runs[n % len(runs)]))
        elif kind == "expire":
            await sim.client.pexpire(sim.stream_key(*runs[n % len(runs)]), 1)


@hsettings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op, min_size=1, max_size=12))
async def test_index_and_scan_answer_alike(
    make_settings: Callable[..., Settings], redis_url: str, flags: str, ops: list[Any]
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    sim, old = BackendSimulator(client), BackendSimulator(client, old_backend=True)
    try:
        async for indexed in open_api(make_settings(index_mode="index", index_resync_s=3600)):
            await wait_for(lambda: index_of(indexed).in_sync)
            await _apply_history(sim, old, ops, indexed)
            # Notifications arrive in order: once this one is seen, all before it were.
            await sim.full_run("sync-marker", "alice", "m", chunks=0)
            await wait_for(lambda: bool(index_of(indexed).find("sync-marker").run_ids))
            await asyncio.sleep(0.05)  # let `expire`d keys be reaped by Redis
            async for scanned in open_api(make_settings(index_mode="scan")):
                for conv in CONVS:
                    for user in USERS:
                        a = await indexed.get(conv, "active-session", user=user)
                        b = await scanned.get(conv, "active-session", user=user)
                        assert a.status_code == b.status_code
                        if a.status_code == 200:
                            fields = ("sessionId", "status", "cursor")
                            assert [a.json()[f] for f in fields] == [b.json()[f] for f in fields]
    finally:
        await client.aclose()
