"""Honest readiness without keyspace notifications (issue 9): in `auto` mode every request
then SCANs the keyspace, so the process is ready only while one SCAN lookup fits the budget.

Each test runs its own Redis with notifications off, as Redis ships."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from session_sidecar.embedded import EmbeddedRedis
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import Api, open_api
from tests.test_index import index_of, wait_for


@pytest.fixture(scope="module")
def quiet_server() -> Iterator[EmbeddedRedis]:
    # DEBUG POPULATE loads a large keyspace in a fraction of a second.
    with EmbeddedRedis(notify_flags="", extra_args=("--enable-debug-command", "local")) as server:
        yield server


@pytest.fixture
async def quiet(quiet_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(quiet_server.url)
    await client.flushdb()
    await client.config_set("notify-keyspace-events", "")
    yield client
    await client.aclose()


async def _metrics(api: Api) -> dict[str, float]:
    text = (await api.client.get("/metrics")).text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


async def test_a_scan_lookup_over_budget_is_not_ready_and_says_what_to_set(
    make_settings: Callable[..., Settings], quiet_server: EmbeddedRedis, quiet: aioredis.Redis
) -> None:
    await quiet.execute_command("DEBUG", "POPULATE", 200_000, "unrelated")  # type: ignore[no-untyped-call]
    # A 50 ms budget: one SCAN lookup over 200,000 keys takes hundreds of ms here.
    settings = make_settings(
        redis_url=quiet_server.url, index_mode="auto", redis_timeout_ms=50, index_resync_s=1
    )
    async for api in open_api(settings):
        index = index_of(api)
        await wait_for(lambda: index.scan_s is not None, timeout_s=30)
        readyz = await api.client.get("/readyz")
        assert readyz.status_code == 503
        reason = readyz.json()["reason"]
        assert "\n" not in reason
        assert "over 200000 keys" in reason and "SIDECAR_REDIS_TIMEOUT_MS" in reason
        assert "`CONFIG SET notify-keyspace-events Egxn`" in reason
        for managed in ("parameter group on AWS ElastiCache and MemoryDB", "Memorystore", "Azure"):
            assert managed in reason
        # Never ready and 503 at once: a request does miss the budget.
        assert (await api.get("conv-slow", "active-session")).status_code == 503
        metrics = await _metrics(api)
        assert metrics["sidecar_index_enabled"] == 0.0
        assert metrics["sidecar_scan_lookup_seconds"] > 0.025

        # Timed again every SIDECAR_INDEX_RESYNC_S: a small keyspace is ready again.
        await quiet.flushdb()
        await wait_for(lambda: index.not_ready_reason() is None, timeout_s=30)
        assert (await api.client.get("/readyz")).status_code == 200

        # The flags the reason named: the live index takes over within seconds.
        await quiet.config_set("notify-keyspace-events", "Egxn")
        await wait_for(lambda: index.in_sync, timeout_s=30)
        assert (await _metrics(api))["sidecar_index_enabled"] == 1.0
        assert (await api.client.get("/readyz")).status_code == 200


async def test_a_small_keyspace_without_notifications_is_ready_and_answers(
    make_settings: Callable[..., Settings], quiet_server: EmbeddedRedis, quiet: aioredis.Redis
) -> None:
    run_id = await BackendSimulator(quiet).full_run("conv-small", "alice", "m", status=None)
    async for api in open_api(make_settings(redis_url=quiet_server.url, index_mode="auto")):
        index = index_of(api)
        await wait_for(lambda: index.scan_s is not None, timeout_s=30)
        # Ready, and a request answers within the budget (past it: 503).
        assert (await api.client.get("/readyz")).status_code == 200
        answer = await api.get("conv-small", "active-session")
        assert answer.status_code == 200 and answer.json()["sessionId"] == run_id
        assert not index.in_sync and index.disabled_reason is not None
