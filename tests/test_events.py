"""GET .../events (SPEC 8.2): Server-Sent Events over real HTTP against a real Redis."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from session_sidecar.embedded import EmbeddedRedis
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.streams import readers, wire
from tests.conftest import token
from tests.streaming import Served, http_client, open_events, parse_sse, serve, sse_events
from tests.test_index import wait_for

CONV = "conv-events"


@pytest.fixture
def served(make_settings: Callable[..., Settings], redis_client: aioredis.Redis) -> Iterator[Served]:
    with serve(make_settings()) as served:
        yield served


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with http_client() as client:
        yield client


async def events_of(http: httpx.AsyncClient, served: Served, **kwargs: Any) -> list[dict[str, Any]]:
    async with open_events(http, served, CONV, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        return parse_sse((await response.aread()).decode())


async def stream_ids(sim: BackendSimulator, run: str) -> list[str]:
    entries: Any = await sim.client.xrange(sim.stream_key(CONV, run))
    return [entry_id.decode() for entry_id, _ in entries]


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def test_framing_ids_types_and_data(
    served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    t0 = int(time.time() * 1000) - 60_000
    run = await sim.new_run(CONV, "alice", "m1")
    await sim.queue(CONV, run, t0)
    await sim.start(CONV, run, t0 + 1)
    tools = [{"tool": "grep", "args": {"q": "ü"}}]
    fields = {"content": "héllo 😀\nline", "citations_json": "[]", "tool_calls_json": json.dumps(tools)}
    await sim.xadd(CONV, run, "chunk", {**fields, "thinking": "hm"}, t0 + 2)
    await sim.xadd(CONV, run, "custom\ntype", {"x_json": "{broken", "plain": "v"}, t0 + 3)
    await sim.end(CONV, run, "completed", t0 + 4)
    ids = await stream_ids(sim, run)

    async with open_events(http, served, CONV, run_id=run) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-store"
        raw = (await response.aread()).decode()
    assert raw.startswith("retry: 2000\n\n")
    events = parse_sse(raw)
    assert events[0] == {"retry": "2000"}
    assert [e.get("id") for e in events[1:]] == ids
    assert [e["event"] for e in events[1:]] == ["queued", "start", "chunk", "custom type", "end"]
    data = [json.loads(e["data"]) for e in events[1:]]
    assert data[0] == {
        "created_at": data[0]["created_at"],
        "status": "queued",
        "message": "Task queued for processing",
    }
    assert list(data[1]) == ["created_at", "agent_id", "status", "message"]  # as written, minus the address
    chunk = {"message": "héllo 😀\nline", "citations": [], "tool_calls": tools, "thinking": "hm"}
    assert events[3]["data"] == compact(chunk)  # one line, compact, UTF-8 as is
    assert data[3] == {"created_at": data[3]["created_at"], "x": [], "plain": "v"}  # `*_json` decoded
    assert data[4]["status"] == "completed" and data[4]["usage"][0]["total_tokens"] == 600
    assert "usage_json" not in data[4] and "type" not in data[4] and "run_id" not in data[4]


async def test_positions_last_event_id_beats_cursor_and_is_exclusive(
    served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    run = await sim.full_run(CONV, "alice", "m1", chunks=4, start_ms=int(time.time() * 1000) - 60_000)
    ids = await stream_ids(sim, run)

    def ids_of(events: list[dict[str, Any]]) -> list[str]:
        return [e["id"] for e in events if "id" in e]

    assert ids_of(await events_of(http, served, run_id=run)) == ids
    assert ids_of(await events_of(http, served, run_id=run, cursor="0-0")) == ids
    assert ids_of(await events_of(http, served, run_id=run, cursor=ids[2])) == ids[3:]
    assert ids_of(await events_of(http, served, run_id=run, cursor=ids[0], last_event_id=ids[4])) == ids[5:]
    async with open_events(http, served, CONV, run_id=run, last_event_id=ids[-1]) as response:
        assert response.status_code == 204  # it has the `end`: an EventSource stops reconnecting

    live = await sim.full_run(CONV, "alice", "m2", chunks=2, status=None)
    async with open_events(http, served, CONV, run_id=live, cursor="$") as response:
        events = sse_events(response)
        assert await anext(events) == {"retry": "2000"}
        await sim.chunk(CONV, live, "new")
        newest = await anext(events)  # only what came after the request
        assert newest["event"] == "chunk" and json.loads(newest["data"])["message"] == "new"


async def test_default_run_and_refusals(
    served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    async with open_events(http, served, CONV) as response:
        await response.aread()
        assert response.status_code == 404
        assert response.json() == {"error": "No active session found", "conversationId": CONV}
    old = await sim.full_run(CONV, "alice", "m1", chunks=1, start_ms=int(time.time() * 1000) - 60_000)
    live = await sim.full_run(CONV, "alice", "m2", chunks=1, status=None)
    bobs = await sim.full_run(CONV, "bob", "m3", chunks=1, status=None)
    async with open_events(http, served, CONV) as response:  # the run active-session chooses
        events = sse_events(response)
        assert await anext(events) == {"retry": "2000"}
        assert (await anext(events))["id"] == (await stream_ids(sim, live))[0]
    assert old != live
    for params, headers, status, error in (
        ({"run_id": bobs}, {}, 404, "Session not found"),  # hidden, exactly as missing
        ({"run_id": "conversation:alice:none"}, {}, 404, "Session not found"),
        ({"cursor": "abc"}, {}, 400, "Malformed cursor"),
        ({"cursor": "1-0"}, {"Last-Event-ID": "x-1"}, 400, "Malformed cursor"),
    ):
        url = served.path(CONV, "events")
        response = await http.get(
            url, params=params, headers={"Authorization": f"Bearer {token('alice')}", **headers}
        )
        assert response.status_code == status, response.text
        assert response.json() == {"error": error, "conversationId": CONV}


async def test_reconnects_with_last_event_id_get_every_entry_once(
    served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    run = await sim.full_run(CONV, "alice", "m1", chunks=3, status=None)

    async def write() -> None:
        for i in range(60):
            await sim.chunk(CONV, run, f"c{i}")
            await asyncio.sleep(random.uniform(0, 0.02))
        await sim.end(CONV, run)

    writer = asyncio.create_task(write())
    received: list[str] = []
    last: str | None = None
    connections = 0
    while not received or received[-1] != "end":
        connections += 1
        async with open_events(http, served, CONV, run_id=run, last_event_id=last) as response:
            assert response.status_code == 200
            wanted = random.randint(1, 7)  # then drop the connection, as a flaky network does
            async for event in sse_events(response):
                if "id" in event:
                    received.append(event["event"])
                    last = event["id"]
                    wanted -= 1
                    if wanted == 0 or event["event"] == "end":
                        break
    await writer
    ids = await stream_ids(sim, run)
    assert last == ids[-1] and len(received) == len(ids) and connections > 5
    assert received == ["queued", "start", *["chunk"] * 63, "end"]
    hub = served.sidecar.hub
    await wait_for(lambda: hub.open == 0 and hub.followed == 0)  # every dropped client let go


async def test_gap_when_the_position_was_trimmed_away(
    served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    run = await sim.full_run(CONV, "alice", "m1", chunks=8)
    ids = await stream_ids(sim, run)
    assert (await events_of(http, served, run_id=run))[1]["id"] == ids[0]  # nothing lost: no gap
    await sim.client.xtrim(sim.stream_key(CONV, run), maxlen=5, approximate=False)
    kept = ids[-5:]
    for position in ("0-0", ids[2]):
        events = await events_of(http, served, run_id=run, cursor=position)
        assert events[1] == {"event": "gap", "data": compact({"firstAvailable": kept[0]})}  # no id
        assert [e["id"] for e in events[2:]] == kept
    events = await events_of(http, served, run_id=run, last_event_id=kept[0])
    assert "gap" not in [e.get("event") for e in events] and [e["id"] for e in events[1:]] == kept[1:]


async def test_a_queued_run_is_waited_for(
    served: Served, http: httpx.AsyncClient, old_sim: BackendSimulator
) -> None:
    run = await old_sim.new_run(CONV, "alice", "m1")
    async with open_events(http, served, CONV, run_id="conversation:alice:none") as response:
        assert response.status_code == 404  # neither key: nothing to wait for
    await old_sim.queue(CONV, run)  # an older backend: status `pending`, no stream yet
    async with open_events(http, served, CONV, run_id=run) as response:
        assert response.status_code == 200
        events = sse_events(response)
        assert await anext(events) == {"retry": "2000"}
        await asyncio.sleep(0.3)
        await old_sim.start(CONV, run)
        await old_sim.chunk(CONV, run, "first")
        await old_sim.end(CONV, run)
        assert [e["event"] async for e in events] == ["start", "chunk", "end"]


async def test_a_vanished_key_ends_with_a_synthetic_expired_end(
    fast_gone_check: None, served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    run = await sim.full_run(CONV, "alice", "m1", chunks=1, status=None)
    async with open_events(http, served, CONV, run_id=run) as response:
        events = sse_events(response)
        assert [(await anext(events)).get("event") for _ in range(4)] == [None, "queued", "start", "chunk"]
        await sim.client.delete(sim.stream_key(CONV, run))
        rest = [e async for e in events]
    assert rest[-1] == {"event": "end", "data": compact({"status": "expired"})}  # and no `id:`


async def test_keepalive_comments_and_the_longest_response(
    make_settings: Callable[..., Settings], http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    with serve(make_settings(sse_keepalive_s=0.2, sse_max_s=1.5)) as served:
        run = await sim.full_run(CONV, "alice", "m1", chunks=1, status=None)
        started = time.monotonic()
        events = await events_of(http, served, run_id=run)
        elapsed = time.monotonic() - started
    assert elapsed >= 1.4  # ended by SIDECAR_SSE_MAX_S ...
    assert "end" not in [e.get("event") for e in events]  # ... without `end`: the client reconnects
    assert {"comment": "keepalive"} in events[4:]
    assert [e["event"] for e in events if "id" in e] == ["queued", "start", "chunk"]


async def test_redis_failure_is_an_error_event(
    make_settings: Callable[..., Settings], http: httpx.AsyncClient
) -> None:
    with EmbeddedRedis() as own, serve(make_settings(redis_url=own.url, redis_timeout_ms=300)) as served:
        client = aioredis.Redis.from_url(own.url)
        run = await BackendSimulator(client).full_run(CONV, "alice", "m1", chunks=1, status=None)
        await client.aclose()
        async with open_events(http, served, CONV, run_id=run) as response:
            events = sse_events(response)
            assert [(await anext(events)).get("event") for _ in range(4)] == [
                None,
                "queued",
                "start",
                "chunk",
            ]
            own.stop()
            rest = await asyncio.wait_for(collect(events), 20)
        assert rest == [{"event": "error", "data": compact({"error": "Session store unavailable"})}]


async def collect(events: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e async for e in events]


async def test_a_slow_client_is_closed_alone(
    monkeypatch: pytest.MonkeyPatch, served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    """A client that stops reading overflows its own buffer and is closed without `end`;
    a fast client of the same run gets every entry, then the `end`."""
    # Each of the 300 entries below is written only once the fast client has the one before,
    # so each costs a hub round, at most one per ROUND_S (20 ms: 6 s here). The floor only
    # batches entries that come quicker; a shorter one changes nothing this test looks at.
    monkeypatch.setattr(readers, "ROUND_S", 0.002)
    served.sidecar.hub.buffer = 8
    run = await sim.full_run(CONV, "alice", "m1", chunks=0, status=None)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = served.url.removeprefix("http://").split(":")
    slow.connect((host, int(port)))
    path = served.path(CONV, f"events?run_id={run}").removeprefix(served.url)
    slow.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token('alice')}\r\n\r\n".encode())
    await asyncio.sleep(0.5)  # subscribed, then reads nothing
    payload = "x" * 32_000
    async with open_events(http, served, CONV, run_id=run) as response:
        events = sse_events(response)
        assert await anext(events) == {"retry": "2000"}
        seen = [(await anext(events))["event"] for _ in range(2)]
        for _ in range(300):
            await sim.chunk(CONV, run, payload)
            seen.append((await anext(events))["event"])  # the fast one is never held back
        await sim.end(CONV, run)
        seen.extend([e["event"] async for e in events])
    assert seen == ["queued", "start", *["chunk"] * 300, "end"]
    slow.settimeout(10)
    raw = b""
    while chunk := await asyncio.to_thread(slow.recv, 1 << 20):
        raw += chunk
        if raw.endswith(b"\r\n0\r\n\r\n"):
            break  # the body ended properly
    slow.close()
    assert raw.endswith(b"\r\n0\r\n\r\n")
    assert b"event: end" not in raw and raw.count(b"event: chunk") < 300


def test_frames_stay_one_line_and_valid_utf8_on_odd_input() -> None:
    lone_surrogate = '["\\ud800"]'  # valid JSON text, but no UTF-8 can carry it unescaped
    frame = wire.sse_frame("1-0", {"type": "chunk", "content": "a\nb", "tool_calls_json": lone_surrogate})
    expected = '{"message":"a\\nb","citations":[],"tool_calls":["\\ud800"],"thinking":null}'
    assert frame == f"id: 1-0\nevent: chunk\ndata: {expected}\n\n".encode()
    assert wire.sse_frame("2-0", {"x": "é"}) == 'id: 2-0\nevent: unknown\ndata: {"x":"é"}\n\n'.encode()
    gap = b'event: gap\ndata: {"firstAvailable":"3-0"}\n\n'
    assert wire.sse_event("gap", {"firstAvailable": "3-0"}) == gap
