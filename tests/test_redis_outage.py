"""Redis down or slow is a 503 with Retry-After (never a 404, never a hang), and the
service recovers by itself when Redis returns. Each test owns its Redis process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
import redis.asyncio as aioredis

from session_sidecar.embedded import EmbeddedRedis
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import open_api

CONV = "conv-outage"


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    # DEBUG POPULATE fills a large keyspace fast (as in test_readiness.py).
    with EmbeddedRedis(extra_args=("--enable-debug-command", "local")) as server:
        yield server


async def _seed(url: str) -> str:
    client = aioredis.Redis.from_url(url)
    try:
        return await BackendSimulator(client).full_run(CONV, "alice", "m", status=None)
    finally:
        await client.aclose()


async def test_redis_stopped_is_503_then_recovers(
    own_redis: EmbeddedRedis, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(redis_url=own_redis.url, redis_timeout_ms=300)
    async for api in open_api(settings):
        run_id = await _seed(own_redis.url)
        assert (await api.get(CONV, "active-session")).status_code == 200
        assert (await api.client.get("/readyz")).status_code == 200

        own_redis.stop()
        for endpoint in ("active-session", "task-status"):
            started = time.monotonic()
            response = await api.get(CONV, endpoint)
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.headers["cache-control"] == "no-store"
            assert response.json() == {"error": "Session store unavailable", "conversationId": CONV}
            assert elapsed < 5, "a 503 must not wait on a dead server"  # a bound against hangs
        readyz = await api.client.get("/readyz")
        assert readyz.status_code == 503 and "retry-after" in readyz.headers
        assert (await api.client.get("/healthz")).status_code == 200  # liveness ignores Redis

        own_redis.start()  # same port, empty data: the pool must reconnect on its own
        await _seed(own_redis.url)
        response = await api.get(CONV, "active-session")
        assert response.status_code == 200 and response.json()["sessionId"] == run_id
        assert (await api.client.get("/readyz")).status_code == 200
        metrics = (await api.client.get("/metrics")).text
        assert 'sidecar_redis_errors_total{kind="error"}' in metrics


async def test_slow_redis_is_503_within_budget(
    own_redis: EmbeddedRedis, make_settings: Callable[..., Settings]
) -> None:
    await _seed(own_redis.url)
    settings = make_settings(redis_url=own_redis.url, redis_timeout_ms=200)
    async for api in open_api(settings):
        assert (await api.get(CONV, "task-status")).status_code == 200
        blocker = aioredis.Redis.from_url(own_redis.url)
        # Redis stops answering every client for 1.5 s, as under a long blocking command.
        await blocker.execute_command("CLIENT", "PAUSE", "1500", "ALL")  # type: ignore[no-untyped-call]
        started = time.monotonic()
        response = await api.get(CONV, "task-status")
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert response.json()["error"] == "Session store too slow"
        assert response.headers["retry-after"] == "1"
        assert elapsed < 1.2, f"budget 200 ms, answered after {elapsed:.2f} s"
        await blocker.aclose()
        await asyncio.sleep(1.5)
        assert (await api.get(CONV, "task-status")).status_code == 200


async def test_unreachable_at_start_still_serves_503(make_settings: Callable[..., Settings]) -> None:
    with EmbeddedRedis() as server:
        url = server.url
    async for api in open_api(make_settings(redis_url=url, redis_timeout_ms=200)):
        response = await api.get(CONV, "active-session")
        assert response.status_code == 503
        assert response.json()["conversationId"] == CONV


async def test_concurrent_requests_on_a_stalled_redis_all_answer_at_the_deadline(
    own_redis: EmbeddedRedis, make_settings: Callable[..., Settings]
) -> None:
    # 1M keys and SCAN per request: every request runs out of budget mid-command,
    # and the answer must not wait for redis-py to tear the cancelled connection down.
    await _seed(own_redis.url)
    # No read timeout: writing the filler may take seconds on a busy machine, longer than
    # redis-py's default socket timeout (5 s since 8.x). DEBUG POPULATE writes the same
    # million `unrelated:<n>` string keys as a loop of SETs would, in a third of the time.
    filler = aioredis.Redis.from_url(own_redis.url, socket_timeout=None)
    await filler.execute_command("DEBUG", "POPULATE", 1_000_000, "unrelated")  # type: ignore[no-untyped-call]
    assert await filler.dbsize() > 1_000_000
    await filler.aclose()
    settings = make_settings(redis_url=own_redis.url, redis_timeout_ms=300, index_mode="scan")
    async for api in open_api(settings):

        async def timed() -> tuple[int, float]:
            started = time.monotonic()
            response = await api.get(CONV, "active-session")
            return response.status_code, time.monotonic() - started

        for _ in range(3):
            results = await asyncio.gather(*(timed() for _ in range(6)))
            assert {status for status, _ in results} == {503}
            slowest = max(elapsed for _, elapsed in results)
            assert slowest < 0.9, f"budget 300 ms, slowest answer after {slowest:.2f} s"
