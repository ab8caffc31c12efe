"""The live index against a real Redis: creation, deletion, expiry, rename, a killed
subscriber, a lost notification, missing flags; and the same answers as SCAN."""

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
from session_sidecar.index import CLOSE_TIMEOUT_S, LiveIndex
from session_sidecar.notifications import missing_flags
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.store import KeySchema, read_facts
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


@pytest.fixture
async def indexed(make_settings: Callable[..., Settings], redis_client: aioredis.Redis) -> AsyncIterator[Api]:
    async for api in open_api(make_settings(index_mode="index", index_resync_s=3600)):
        await wait_for(lambda: index_of(api).in_sync)
        yield api


def index_of(api: Api) -> LiveIndex:
    index = api.app.state.sidecar.index
    assert isinstance(index, LiveIndex)
    return index


async def test_creation_deletion_and_partial_removal(indexed: Api, sim: BackendSimulator) -> None:
    index = index_of(indexed)
    run_id = await sim.full_run(CONV, "alice", "m", status=None)
    await wait_for(lambda: index.run_ids(CONV) == {run_id})
    assert (await indexed.get(CONV, "active-session")).json()["sessionId"] == run_id
    metrics = (await indexed.client.get("/metrics")).text
    assert "sidecar_index_runs 1.0" in metrics and "sidecar_index_lag_seconds " in metrics
    assert "sidecar_index_enabled 1.0" in metrics

    await sim.client.delete(sim.stream_key(CONV, run_id))
    await asyncio.sleep(0.1)
    assert index.run_ids(CONV) == {run_id}  # the status key still names it
    await sim.client.delete(sim.status_key(CONV, run_id))
    await wait_for(lambda: index.run_ids(CONV) == set())
    assert (await indexed.get(CONV, "active-session")).status_code == 404


async def test_expiry_and_rename(indexed: Api, sim: BackendSimulator) -> None:
    index = index_of(indexed)
    run_id = await sim.full_run(CONV, "alice", "m", status=None)
    await wait_for(lambda: index.run_ids(CONV) == {run_id})
    await sim.client.pexpire(sim.stream_key(CONV, run_id), 50)
    await sim.client.pexpire(sim.status_key(CONV, run_id), 50)
    await wait_for(lambda: index.run_ids(CONV) == set())

    other = await sim.full_run(CONV, "alice", "n", status=None)
    await sim.client.rename(sim.stream_key(CONV, other), sim.stream_key("conv-moved", other))
    await sim.client.delete(sim.status_key(CONV, other))
    await wait_for(lambda: index.run_ids(CONV) == set() and index.run_ids("conv-moved") == {other})


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
    before = index.resyncs
    assert await redis_client.client_kill_filter(_type="pubsub") == 1
    # A run written right after the kill: its notification may be lost, the re-seed finds it.
    run_id = await sim.full_run(CONV, "alice", "during-gap", status=None)
    await wait_for(lambda: index.resyncs > before and index.in_sync, timeout_s=10)
    assert index.run_ids(CONV) == {run_id}
    assert (await indexed.get(CONV, "active-session")).json()["sessionId"] == run_id
    later = await sim.full_run(CONV, "alice", "after", status=None)
    await wait_for(lambda: later in index.run_ids(CONV))


async def test_lost_notification_repaired_by_anti_entropy(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    async for api in open_api(make_settings(index_mode="index", index_resync_s=1)):
        index = index_of(api)
        await wait_for(lambda: index.in_sync)
        flags: Any = await redis_client.config_get("notify-keyspace-events")
        await redis_client.config_set("notify-keyspace-events", "")
        try:
            run_id = await sim.full_run(CONV, "alice", "silent", status=None)
        finally:
            await redis_client.config_set("notify-keyspace-events", flags["notify-keyspace-events"])
        assert index.run_ids(CONV) == set()  # never notified
        await wait_for(lambda: index.run_ids(CONV) == {run_id}, timeout_s=5)
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


async def test_ended_runs_are_read_once_until_their_stream_changes(
    indexed: Api, sim: BackendSimulator, redis_client: aioredis.Redis
) -> None:
    index = index_of(indexed)
    start = int(time.time() * 1000) - 60_000
    ended = await sim.full_run(CONV, "alice", "m", chunks=1, start_ms=start)
    await wait_for(lambda: index.run_ids(CONV) == {ended})
    assert (await indexed.get(CONV, "active-session")).json()["status"] == "completed"
    assert set(index.find(CONV).ended) == {ended}
    before = await _xrange_calls(redis_client)
    body = (await indexed.get(CONV, "active-session")).json()
    assert body["sessionId"] == ended and body["status"] == "completed"
    assert await _xrange_calls(redis_client) == before  # served from the cache

    # The stream is deleted and written again under the same id: the cache must not answer.
    await redis_client.delete(sim.stream_key(CONV, ended))
    await sim.start(CONV, ended)
    await wait_for(lambda: not index.find(CONV).ended)
    body = (await indexed.get(CONV, "active-session")).json()
    assert body["status"] == "active" and body["startedAt"] > start


async def test_an_entry_appended_after_end_is_seen(indexed: Api, sim: BackendSimulator) -> None:
    # No key event reports an append to an existing stream; the cached run's XLEN does.
    index = index_of(indexed)
    ended = await sim.full_run(CONV, "alice", "m", chunks=1)
    await wait_for(lambda: index.run_ids(CONV) == {ended})
    await indexed.get(CONV, "active-session")
    assert set(index.find(CONV).ended) == {ended}
    later = await sim.xadd(CONV, ended, "usage_report", {"usage_json": "{}"})
    body = (await indexed.get(CONV, "active-session")).json()
    assert body["cursor"] == later and body["status"] == "completed"  # finished by its status


async def test_a_read_that_raced_a_stream_event_is_not_kept(indexed: Api, sim: BackendSimulator) -> None:
    index = index_of(indexed)
    ended = await sim.full_run(CONV, "alice", "m", chunks=1)
    await wait_for(lambda: index.run_ids(CONV) == {ended})
    found = index.find(CONV)
    facts = await read_facts(sim.client, KeySchema("chat:stream"), CONV, [ended])
    # A stream event of that run in between (one of another run alone would spoil nothing:
    # test_large_reads.py).
    await sim.client.xadd(sim.stream_key(CONV, ended), {"type": "chunk", "content": "late"})
    await wait_for(lambda: index.find(CONV).epoch != found.epoch)
    index.remember_ended(CONV, facts, found.epoch)
    assert index.find(CONV).ended == {}
    index.remember_ended(CONV, facts, index.find(CONV).epoch)
    assert set(index.find(CONV).ended) == {ended}


async def _xrange_calls(client: aioredis.Redis) -> int:
    stats: Any = await client.info("commandstats")
    return int(sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("xrange", "xrevrange")))


def test_missing_flags() -> None:
    assert missing_flags("", "Egxn") == "Egxn"
    assert missing_flags("AE", "Egxn") == "n"  # A = g$lshzxetd, without n
    assert missing_flags("gxE$tn", "Egxn") == ""


# -- index and SCAN give the same answers over generated histories ----------------

USERS = ("alice", "bob")
CONVS = ("c-1", "c-2", "c-3")
op = st.tuples(
    st.sampled_from(("run", "run", "end", "cancel-old", "del-stream", "del-status", "expire")),
    st.sampled_from(CONVS),
    st.sampled_from(USERS),
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=0, max_value=30),  # minutes ago
)


async def _apply_history(
    sim: BackendSimulator, old: BackendSimulator, ops: list[tuple[str, str, str, int, int]], poll: Api
) -> None:
    now = int(time.time() * 1000)
    runs: list[tuple[str, str]] = []
    for kind, conv, user, n, ago in ops:
        await poll.get(conv, "active-session", user=user)  # fills the ended-run cache mid-history
        start = now - ago * 60_000
        if kind == "run":
            runs.append(
                (conv, await sim.full_run(conv, user, f"m{n}", chunks=n, status=None, start_ms=start))
            )
        elif not runs:
            continue
        elif kind == "end":
            await sim.end(*runs[n % len(runs)], "completed")
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
    make_settings: Callable[..., Settings], redis_url: str, ops: list[Any]
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
            await wait_for(lambda: bool(index_of(indexed).run_ids("sync-marker")))
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
