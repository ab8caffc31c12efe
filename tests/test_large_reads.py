"""Conversations with many runs: a facts read too large for the budget still ends up in
the live index's memory of ended runs (one such read per conversation at a time), so
the conversation answers; and a run being written beside ended ones does not keep their
facts from being remembered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from session_sidecar.ended import EndedRuns
from session_sidecar.index import LiveIndex
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import Api, open_api
from tests.test_index import wait_for

CONV = "crowded"


async def ended_runs(client: aioredis.Redis, count: int) -> None:
    """`count` finished runs of alice, written as the backend leaves them, in one pipeline."""
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        stream = f"chat:stream:{CONV}:conversation:alice:r{i:05d}"
        pipe.xadd(stream, {"type": "start"}, id=f"{1000 + i}-1")
        pipe.xadd(stream, {"type": "end", "status": "completed"}, id=f"{1000 + i}-2")
        pipe.set(f"task:status:{CONV}:conversation:alice:r{i:05d}", "completed")
    await pipe.execute()


def index_of(api: Api) -> LiveIndex:
    index = api.app.state.sidecar.index
    assert isinstance(index, LiveIndex)
    return index


async def commands(client: aioredis.Redis, name: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


async def test_a_large_read_is_done_once_and_the_conversation_then_answers(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    runs = 5000
    await ended_runs(redis_client, runs)
    live = await BackendSimulator(redis_client).full_run(CONV, "alice", "live", status=None)
    # The budget leaves room for what each later lookup costs: one XINFO STREAM per kept run,
    # 5,000 of them, about 350 ms on a 2-core CI machine (a 300 ms budget failed 1 run in 10).
    # The first read, of every fact, takes several times that under eight callers at once.
    settings = make_settings(index_mode="auto", redis_timeout_ms=1000)
    async for api in open_api(settings):
        index = index_of(api)
        await wait_for(lambda: index.in_sync)
        await redis_client.config_resetstat()
        asked = time.monotonic()
        # Eight callers at once, none of the runs' facts known yet.
        first = await asyncio.gather(*(api.get(CONV, "task-status") for _ in range(8)))
        assert {r.status_code for r in first} <= {200, 503}
        assert all(r.json()["sessionId"] == live for r in first if r.status_code == 200)

        async def answers() -> bool:
            response = await api.get(CONV, "active-session")
            assert response.status_code in (200, 503)
            return response.status_code == 200 and response.json()["sessionId"] == live

        await wait_for(answers, timeout_s=15)
        answering_s = time.monotonic() - asked
        # Read once, not once per caller: each caller's own read would have cost 5,001 GETs
        # (a full read's only, one a run: the check of kept facts sends none).
        gets = await commands(redis_client, "get")
        assert gets <= runs + 1 + 100, gets
        assert len(index._entries[CONV].ended.known(index._entries[CONV].runs).facts) == runs
        print(
            f"{runs} ended runs: {[r.status_code for r in first]} for 8 callers at once, "
            f"answering {answering_s * 1000:.0f} ms after; {gets} GET calls in all"
        )


async def test_ended_runs_are_remembered_while_another_run_is_written(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    runs = 1000  # ten round trips: many chunks land while they are read
    await ended_runs(redis_client, runs)
    sim = BackendSimulator(redis_client)
    live = await sim.new_run(CONV, "alice", "live")
    await sim.start(CONV, live)
    async for api in open_api(make_settings(index_mode="auto")):
        index = index_of(api)
        await wait_for(lambda: index.in_sync and index.follows_writes)
        sessions = api.app.state.sidecar.sessions
        writing = True
        written = 0

        async def write() -> None:
            nonlocal written
            while writing:
                await sim.chunk(CONV, live, f"c{written} ")
                written += 1
                await asyncio.sleep(0.005)

        writer = asyncio.create_task(write())
        try:
            await wait_for(lambda: written > 0)
            before = written
            # One question; its read may outlast the budget (a 503) but goes on all the same.
            response = await api.get(CONV, "active-session")
            assert response.status_code == 503 or response.json()["sessionId"] == live
            await wait_for(lambda: not sessions._large_reads, timeout_s=15)
            during = written - before
        finally:
            writing = False
            await writer
        # Every ended run's facts from that one read, though the live run was written meanwhile;
        # never the live run's own (its stream goes on).
        assert during > 1
        kept = index._entries[CONV].ended.known(index._entries[CONV].runs).facts
        assert len(kept) == runs and live not in kept


def test_a_read_keeps_facts_only_of_runs_without_a_stream_event_since() -> None:
    conversation = EndedRuns()
    began = conversation.known(()).since  # a read begins
    assert conversation.unchanged_since("a", began) and conversation.unchanged_since("b", began)
    conversation.changed("live")  # a run written meanwhile spoils only its own facts
    conversation.changed("live")
    assert conversation.unchanged_since("a", began) and not conversation.unchanged_since("live", began)
    conversation.changed("b")  # events of two runs: any fact may be stale
    assert not conversation.unchanged_since("a", began) and not conversation.unchanged_since("b", began)
    later = conversation.known(()).since  # a read that began after all of them keeps everything
    assert conversation.unchanged_since("a", later) and conversation.unchanged_since("live", later)


async def test_a_large_read_on_a_stalled_redis_ends_at_its_own_bound(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, redis_url: str
) -> None:
    # The requests' client has no socket timeout: each request's budget bounds its reads.
    # A large read outlives its request, so it has a bound of its own, one budget per round
    # trip (250 runs, 3 trips: 0.6 s); without it the read would wait for Redis to answer.
    await ended_runs(redis_client, 250)
    async for api in open_api(make_settings(index_mode="auto", redis_timeout_ms=200)):
        index = index_of(api)
        await wait_for(lambda: index.in_sync)
        sessions = api.app.state.sidecar.sessions
        blocker = aioredis.Redis.from_url(redis_url)
        try:
            # Paused past the 2.5 s the read may take: without its bound it would end only
            # when Redis answers again. (Not longer: UNPAUSE below waits out the pause too.)
            await blocker.execute_command("CLIENT", "PAUSE", "3500", "ALL")  # type: ignore[no-untyped-call]
            paused = time.monotonic()
            assert (await api.get(CONV, "active-session")).status_code == 503
            assert sessions._large_reads, "the read goes on past its request"
            await wait_for(lambda: not sessions._large_reads, timeout_s=4)
            ended_s = time.monotonic() - paused
            assert ended_s < 2.5, f"ended after {ended_s:.2f} s, with Redis paused for 3.5 s"
        finally:
            await blocker.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
            await blocker.aclose()

        async def answers() -> bool:
            return (await api.get(CONV, "active-session")).status_code == 200

        await wait_for(answers, timeout_s=10)
