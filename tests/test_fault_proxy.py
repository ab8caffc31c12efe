"""Faults on the wire between the service and a real Redis, under steady load of both
endpoints: latency below and above the budget, a reply that stalls half-way, connections
reset mid-pipeline, a blackhole. Outside the fault only right answers; during it only
503 or right answers (never a 404 or another run caused by it); no answer slower than
the budget plus a margin; and right answers again soon after the fault ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from session_sidecar.embedded import EmbeddedRedis
from session_sidecar.settings import Settings
from tests.conftest import open_api
from tests.faultproxy import Fault, FaultProxy
from tests.loadcheck import Load, expected_answers, judge, seed_world
from tests.test_index import wait_for

BUDGET_MS = 400
MARGIN_S = 1.0  # 2 shared cores: scheduling noise, not the service, sets this margin
SETTLE_S = 0.6  # after the fault ends, answers must be right again within this
BEFORE_S, DURING_S, AFTER_S = 0.25, 0.6, SETTLE_S + 0.3

# name -> (fault, added latency, must every Redis read fail while it lasts)
FAULTS = {
    "latency-below-budget": (Fault.LATENCY, BUDGET_MS / 8000, False),
    "latency-above-budget": (Fault.LATENCY, BUDGET_MS * 2.5 / 1000, True),
    "stall-mid-reply": (Fault.STALL, 0.0, True),
    "reset-mid-pipeline": (Fault.RESET, 0.0, True),
    "blackhole": (Fault.BLACKHOLE, 0.0, True),
}


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as redis_server:
        yield redis_server


@pytest.fixture
async def proxy(server: EmbeddedRedis) -> AsyncIterator[FaultProxy]:
    fault_proxy = await FaultProxy(server.port).start()
    yield fault_proxy
    await fault_proxy.close()


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault_under_load(
    name: str, proxy: FaultProxy, server: EmbeddedRedis, make_settings: Callable[..., Settings]
) -> None:
    fault, latency_s, must_fail = FAULTS[name]
    conversations, shown = await seed_world(server.url)
    # The production default: the live index, whose subscriber goes through the proxy too.
    settings = make_settings(redis_url=proxy.url, index_mode="auto", redis_timeout_ms=BUDGET_MS)
    async for api in open_api(settings):
        await wait_for(lambda: api.app.state.sidecar.index.in_sync)
        expected = await expected_answers(api, conversations)
        for conv, run_id in shown.items():
            assert expected[(conv, "active-session")][1][0] == run_id
        assert expected[("bobs", "task-status")][0] == expected[("empty", "task-status")][0] == 404

        async with Load(api, expected) as load:
            await asyncio.sleep(BEFORE_S)
            on = time.monotonic()
            proxy.set(fault, latency_s)
            await asyncio.sleep(DURING_S)
            off = time.monotonic()
            proxy.heal()
            await asyncio.sleep(AFTER_S)
        window = judge(load, on, off, SETTLE_S)
        print(window.summary(name), f"peak connections {proxy.peak}")

        assert not window.wrong, f"wrong answers: {window.wrong[:5]}"
        assert not window.not_right_outside, f"not right outside the fault: {window.not_right_outside[:5]}"
        assert window.before and window.after
        assert window.slowest_s < BUDGET_MS / 1000 + MARGIN_S, window.summary(name)
        if must_fail:
            assert 503 in window.during and window.right_while_faulty == 0, window.summary(name)
        else:
            assert 503 not in window.during, window.summary(name)
        assert window.first_right_after_s is not None and window.first_right_after_s < SETTLE_S
        # Bounded connections: a caller's connection cut at the deadline is closed, not left
        # waiting (the requests' client has no socket timeout of its own), so at most a new
        # one beside it per caller, plus the index's two (and a little slack).
        assert proxy.peak <= 2 * load.clients + 4, f"{proxy.peak} connections open at once"
