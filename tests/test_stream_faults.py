"""The wire faults of test_fault_proxy while clients follow a run being written, with
`events` (SSE, resumed with Last-Event-ID) and `resume`: every SSE client ends up with
every entry exactly once and in order; a resume body (it has no ids to resume from, and
its end reads as a finished answer) rides out a brief fault and holds the whole answer,
and ends, as a clean prefix, only when Redis stays down past its bound; no stream stays
silent past its keepalive."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from session_sidecar.embedded import EmbeddedRedis
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.streams import endpoints
from tests.faultproxy import Fault, FaultProxy
from tests.streaming import Served, event_of, http_client, open_events, open_resume, serve
from tests.test_fault_proxy import BUDGET_MS, FAULTS

CONV = "conv-follow"
KEEPALIVE_S = 0.25
MARGIN_S = 0.75  # 2 shared cores; still under FAULT_FOR_S, so a stream that waits out the fault fails
CHUNKS, CHUNK_EVERY_S = 30, 0.05
FAULT_AT_S, FAULT_FOR_S = 0.5, 1.2
FOLLOWERS = 2  # of each kind


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as redis_server:
        yield redis_server


@pytest.fixture
async def proxy(server: EmbeddedRedis) -> AsyncIterator[FaultProxy]:
    fault_proxy = await FaultProxy(server.port).start()
    yield fault_proxy
    await fault_proxy.close()


@dataclass
class Followed:
    items: list[Any]  # SSE entry ids, or resume objects
    streams: int = 0  # streamed answers opened
    refused: int = 0  # 503s before the first byte
    errors: int = 0  # SSE `event: error`
    finished: bool = False  # saw the end (SSE `end` entry or 204)
    silence_s: float = 0.0  # longest wait for the next bytes of an open stream


async def _read(response: httpx.Response, followed: Followed) -> AsyncIterator[str]:
    """The body's text as it comes, noting the longest silence."""
    heard = time.monotonic()
    async for text in response.aiter_text():
        followed.silence_s = max(followed.silence_s, time.monotonic() - heard)
        heard = time.monotonic()
        yield text
    followed.silence_s = max(followed.silence_s, time.monotonic() - heard)


async def follow_events(http: httpx.AsyncClient, served: Served, run_id: str, until: float) -> Followed:
    """An EventSource: reconnects with Last-Event-ID after any end but the run's own."""
    followed = Followed([])
    last: str | None = None
    while time.monotonic() < until:
        async with open_events(http, served, CONV, run_id=run_id, last_event_id=last) as response:
            if response.status_code == 204:
                followed.finished = True
                return followed
            if response.status_code == 503:
                followed.refused += 1
                await asyncio.sleep(0.2)
                continue
            assert response.status_code == 200, await response.aread()
            followed.streams += 1
            buffer = ""
            async for text in _read(response, followed):
                buffer += text
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    event = event_of(block)
                    followed.errors += event.get("event") == "error"
                    if "id" in event:
                        followed.items.append(event["id"])
                        last = event["id"]
                        followed.finished = event.get("event") == "end"
    return followed


async def follow_resume(http: httpx.AsyncClient, served: Served, run_id: str, until: float) -> Followed:
    """The web frontend's resume: one body, retried only while refused before its first byte."""
    followed = Followed([])
    while time.monotonic() < until:
        async with open_resume(http, served, CONV, run_id, cursor="0-0") as response:
            if response.status_code == 503:
                followed.refused += 1
                await asyncio.sleep(0.2)
                continue
            assert response.status_code == 200, await response.aread()
            followed.streams += 1
            followed.items = resume_objects("".join([text async for text in _read(response, followed)]))
        return followed
    return followed


def resume_objects(body: str) -> list[Any]:
    """The JSON objects of a resume body, written one after the other (whitespace between)."""
    decoder, objects, position = json.JSONDecoder(), [], 0
    while (position := len(body) - len(body[position:].lstrip())) < len(body):
        item, position = decoder.raw_decode(body, position)
        objects.append(item)
    return objects


async def write_run(sim: BackendSimulator, run_id: str) -> None:
    await sim.start(CONV, run_id)
    for i in range(CHUNKS):
        await asyncio.sleep(CHUNK_EVERY_S)
        await sim.chunk(CONV, run_id, f"c{i:03d} ")
    await sim.end(CONV, run_id)


@pytest.mark.parametrize("name", [name for name in FAULTS if FAULTS[name][2]])
async def test_followers_through_a_fault(
    name: str, proxy: FaultProxy, server: EmbeddedRedis, make_settings: Callable[..., Settings]
) -> None:
    fault, latency_s, _ = FAULTS[name]
    client = aioredis.Redis.from_url(server.url)  # the backend writes past the proxy
    await client.flushdb()
    sim = BackendSimulator(client)
    settings = make_settings(
        redis_url=proxy.url,
        index_mode="auto",
        redis_timeout_ms=BUDGET_MS,
        sse_keepalive_s=KEEPALIVE_S,
        resume_keepalive_s=KEEPALIVE_S,
    )
    run_id = await sim.new_run(CONV, "alice", "m")
    await sim.queue(CONV, run_id)
    with serve(settings) as served:
        async with http_client() as http:
            until = time.monotonic() + 20
            followers = [
                *(asyncio.create_task(follow_events(http, served, run_id, until)) for _ in range(FOLLOWERS)),
                *(asyncio.create_task(follow_resume(http, served, run_id, until)) for _ in range(FOLLOWERS)),
            ]
            writing = asyncio.create_task(write_run(sim, run_id))
            await asyncio.sleep(FAULT_AT_S)
            proxy.set(fault, latency_s)
            await asyncio.sleep(FAULT_FOR_S)
            proxy.heal()
            await writing
            results = await asyncio.wait_for(asyncio.gather(*followers), 25)
            async with open_resume(http, served, CONV, run_id) as response:
                assert response.status_code == 200
                whole = resume_objects((await response.aread()).decode())

    entries: Any = await client.xrange(sim.stream_key(CONV, run_id))
    await client.aclose()
    ids = [entry_id.decode() for entry_id, _ in entries]
    sse, resumed = results[:FOLLOWERS], results[FOLLOWERS:]
    print(
        f"{name}: SSE {[(f.streams, f.refused, f.errors, round(f.silence_s, 2)) for f in sse]} "
        f"(streams, 503s, error events, longest silence s); resume "
        f"{[(len(f.items), f.refused, round(f.silence_s, 2)) for f in resumed]} "
        f"(objects of {len(whole)}, 503s, longest silence s)"
    )
    for followed in sse:
        # XRANGE's order: every entry once, in order, through every reconnect.
        assert followed.finished and followed.items == ids, "a gap, a duplicate or a missing end"
        assert followed.silence_s < KEEPALIVE_S + MARGIN_S
    for followed in resumed:
        # One body, the whole answer: the fault (shorter than RESUME_RETRY_S) did not end it.
        assert followed.streams == 1 and followed.items == whole
        assert followed.silence_s < KEEPALIVE_S + MARGIN_S


async def test_resume_ends_when_redis_stays_down(
    proxy: FaultProxy,
    server: EmbeddedRedis,
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bound_s = 1.5
    monkeypatch.setattr(endpoints, "RESUME_RETRY_S", bound_s)
    client = aioredis.Redis.from_url(server.url)
    await client.flushdb()
    sim = BackendSimulator(client)
    settings = make_settings(
        redis_url=proxy.url, index_mode="auto", redis_timeout_ms=BUDGET_MS, resume_keepalive_s=KEEPALIVE_S
    )
    run_id = await sim.new_run(CONV, "alice", "m")
    await sim.queue(CONV, run_id)
    with serve(settings) as served:
        async with http_client() as http:
            following = asyncio.create_task(follow_resume(http, served, run_id, time.monotonic() + 20))
            writing = asyncio.create_task(write_run(sim, run_id))
            await asyncio.sleep(FAULT_AT_S)
            proxy.set(Fault.RESET)
            down = time.monotonic()
            # Down far longer than the bound: the body must end on its own meanwhile.
            done, _ = await asyncio.wait({following}, timeout=bound_s + 6)
            ended_after_s = time.monotonic() - down
            proxy.heal()
            await writing
            assert done, "the resume body outlived its bound"
            followed = following.result()
            async with open_resume(http, served, CONV, run_id) as response:
                whole = resume_objects((await response.aread()).decode())
    await client.aclose()
    print(
        f"Redis down for good: the resume body ended {ended_after_s:.2f} s after the fault began "
        f"(bound {bound_s} s), with {len(followed.items)} of {len(whole)} objects; longest silence "
        f"{followed.silence_s:.2f} s"
    )
    assert followed.streams == 1 and 0 < len(followed.items) < len(whole)
    assert followed.items == whole[: len(followed.items)]
    assert bound_s <= ended_after_s < bound_s + endpoints.RETRY_PAUSE_MAX_S + BUDGET_MS / 1000 + MARGIN_S
    assert followed.silence_s < KEEPALIVE_S + MARGIN_S
