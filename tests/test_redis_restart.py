"""Redis killed with SIGKILL under load and restarted on the same port: with its data
(append-only file), the answers are 503 or right throughout and the live index re-seeds;
empty, every run is gone and the answers turn to 404 within a bound, never a stale 200
from the index's memory of ended runs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from session_sidecar.embedded import EmbeddedRedis
from session_sidecar.index import LiveIndex
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import Api, open_api
from tests.loadcheck import Load, Question, expected_answers, judge, seed_world
from tests.test_index import Seeds, wait_for

BUDGET_MS = 400
MARGIN_S = 1.0
DOWN_S = 0.6
SETTLE_S = 1.5  # once Redis is back, right answers (or 404s, when empty) within this
# Every append fsynced: a SIGKILL loses nothing, so the restart brings the same runs back.
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


async def sigkill(server: EmbeddedRedis) -> None:
    client = aioredis.Redis.from_url(server.url)
    pid = int((await client.info("server"))["process_id"])
    await client.aclose()
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(server.stop)  # reaps the process; the data dir stays


def index_of(api: Api) -> LiveIndex:
    index = api.app.state.sidecar.index
    assert isinstance(index, LiveIndex)
    return index


async def test_sigkill_and_restart_with_data(make_settings: Callable[..., Settings]) -> None:
    with EmbeddedRedis(extra_args=DURABLE) as server:
        conversations, _ = await seed_world(server.url)
        settings = make_settings(redis_url=server.url, index_mode="auto", redis_timeout_ms=BUDGET_MS)
        async for api in open_api(settings):
            index = index_of(api)
            await wait_for(lambda: index.in_sync)
            seeded = {conv: index.find(conv).run_ids for conv in conversations}
            expected = await expected_answers(api, conversations)
            async with Load(api, expected) as load:
                await asyncio.sleep(0.3)
                await sigkill(server)
                on = time.monotonic()  # the process is dead and reaped
                await asyncio.sleep(DOWN_S)
                seeds = Seeds(index)
                off = time.monotonic()  # recovery is counted from the restart, Redis's own boot included
                await asyncio.to_thread(server.start)
                await asyncio.sleep(SETTLE_S + 0.5)
            window = judge(load, on, off, SETTLE_S)
            print(window.summary("sigkill, restart with data"))
            assert not window.wrong, f"wrong answers: {window.wrong[:5]}"
            assert not window.not_right_outside, window.not_right_outside[:5]
            assert 503 in window.during and window.right_while_faulty == 0
            assert window.slowest_s < BUDGET_MS / 1000 + MARGIN_S
            assert window.first_right_after_s is not None and window.first_right_after_s < SETTLE_S
            # The index re-seeded from the restarted server, and follows it live again.
            assert seeds.count > 0 and index.in_sync
            assert {conv: index.find(conv).run_ids for conv in conversations} == seeded
            await _new_run_is_seen(api, server.url)


async def test_sigkill_and_restart_empty(make_settings: Callable[..., Settings]) -> None:
    with EmbeddedRedis() as server:
        conversations, _ = await seed_world(server.url)
        settings = make_settings(redis_url=server.url, index_mode="auto", redis_timeout_ms=BUDGET_MS)
        async for api in open_api(settings):
            index = index_of(api)
            await wait_for(lambda: index.in_sync)
            expected = await expected_answers(api, conversations)
            # Every ended run's facts are in the index's memory now: the stale answers to refuse.
            assert sum(len(c.ended.known(c.runs).facts) for c in index._entries.values()) >= 6
            async with Load(api, expected) as load:
                await asyncio.sleep(0.3)
                await sigkill(server)
                killed = time.monotonic()
                await asyncio.sleep(DOWN_S)
                back = time.monotonic()
                await asyncio.to_thread(server.start)
                await asyncio.sleep(SETTLE_S + 0.5)

            after_kill = [a for a in load.answers if a.started > killed]
            stale = [a for a in after_kill if a.status == 200]
            assert not stale, f"answers from before the restart: {stale[:5]}"
            while_down = [a for a in after_kill if a.ended < back and load.needs_redis(a)]
            assert while_down and {a.status for a in while_down} == {503}
            assert {a.status for a in after_kill} <= {503, 404}
            settled = [a for a in load.answers if a.started > back + SETTLE_S]
            assert settled and {a.status for a in settled} == {404}
            # Restart -> every question that had runs has answered 404 (Redis's own boot included).
            first_404: dict[Question, float] = {}
            for a in after_kill:
                if a.status == 404 and load.needs_redis(a):
                    first_404[a.question] = min(first_404.get(a.question, a.ended), a.ended)
            assert set(first_404) == {q for q in expected if expected[q][0] == 200}
            all_404_s = max(first_404.values()) - back
            print(
                f"sigkill, restart empty: {len(after_kill)} answers after the kill; every run gone "
                f"(all 404) {all_404_s * 1000:.0f} ms after the restart"
            )
            assert all_404_s < SETTLE_S
            assert max(a.elapsed for a in load.answers) < BUDGET_MS / 1000 + MARGIN_S
            await wait_for(lambda: index.in_sync and index.size == 0)
            await _new_run_is_seen(api, server.url)


async def _new_run_is_seen(api: Api, url: str) -> None:
    """A run written after the restart is found, so the index follows the new server."""
    client = aioredis.Redis.from_url(url)
    run_id = await BackendSimulator(client).full_run("empty", "alice", "after", status=None)
    await client.aclose()

    async def shown() -> bool:
        response = await api.get("empty", "active-session")
        return response.status_code == 200 and response.json()["sessionId"] == run_id

    await wait_for(shown)
