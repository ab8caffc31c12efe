"""POST .../resume/{session_id} (SPEC 8.1) over real HTTP against a real Redis: the bytes
the backend's own route sends, replay then live, and how the body ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from session_sidecar.embedded import EmbeddedRedis
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.store.client import MAX_CONNECTIONS
from session_sidecar.streams import endpoints, wire
from session_sidecar.streams.readers import HUB_CLIENT_NAME
from tests.conftest import auth
from tests.streaming import Served, http_client, open_resume, resume_body, serve
from tests.test_index import wait_for

CONV = "019953dd-6de7-7f7a-bf64-96c54db89201"
EMPTY: dict[str, Any] = {"message": "", "citations": [], "tool_calls": [], "thinking": None}


def chunk(message: str = "", citations: Any = (), tool_calls: Any = (), thinking: Any = None) -> Any:
    return {
        "message": message,
        "citations": list(citations),
        "tool_calls": list(tool_calls),
        "thinking": thinking,
    }


def backend_bytes(*objects: Any) -> bytes:
    """What the backend's route writes: `json.dumps(response.dict())` per entry, nothing between."""
    return b"".join(json.dumps(obj).encode() for obj in objects)


def parse_body(body: bytes) -> list[Any]:
    """The frontend's reading: concatenated JSON objects, whitespace between them skipped."""
    text, decoder, i = body.decode(), json.JSONDecoder(), 0
    objects: list[Any] = []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return objects
        obj, i = decoder.raw_decode(text, i)
        objects.append(obj)


async def rest_of(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


@pytest.fixture
def served(make_settings: Callable[..., Settings], redis_client: aioredis.Redis) -> Iterator[Served]:
    with serve(make_settings()) as served:
        yield served


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with http_client() as client:
        yield client


async def test_bytes_equal_json_dumps_of_every_kind_of_entry(
    served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    t0 = int(time.time() * 1000) - 60_000
    run = await sim.new_run(CONV, "alice", "m1")
    await sim.queue(CONV, run, t0)
    await sim.start(CONV, run, t0 + 1)
    text = 'Grüße, 世界! 😀🎉 "quoted" \\ back\nnew line\ttab \u2028 \x01 </script>'
    citations = ["docs/ä.md", 'https://x.test/?q="a"']
    tools = [{"tool_name": "search", "args": {"q": "naïve 🙂", "n": 1.5, "big": 10**20, "x": [None, True]}}]
    await sim.xadd(
        CONV,
        run,
        "chunk",
        {
            "content": text,
            "citations_json": json.dumps(citations),
            "tool_calls_json": json.dumps(tools, ensure_ascii=False),
            "thinking": "Hmm… 🤔",
            "reasoning_json": "{}",
        },
        t0 + 2,
    )
    await sim.chunk(CONV, run, "plain", t0 + 3)
    await sim.xadd(CONV, run, "progress", {"step": "3"}, t0 + 4)  # unknown: skipped
    await sim.xadd(CONV, run, "chunk", {"citations_json": "not json", "tool_calls_json": "{}"}, t0 + 5)
    await sim.xadd(
        CONV, run, "chunk", {"content": "1.0 and 1e16", "tool_calls_json": "[1.0, 1e16, -0.0]"}, t0 + 6
    )
    await sim.end(CONV, run, "completed", t0 + 7)
    await sim.chunk(CONV, run, "after the end", t0 + 8)  # never sent: the body ends at `end`

    body = await resume_body(http, served, CONV, run)

    assert body == backend_bytes(
        EMPTY,
        chunk(text, citations, tools, "Hmm… 🤔"),
        chunk("plain"),
        chunk(),
        chunk("1.0 and 1e16", (), [1.0, 1e16, -0.0]),
    )
    assert b"\\u00fc" in body and b"\\ud83d\\ude00" in body and body.isascii()  # escaped, as the backend


async def test_cursor_forms_replay_inclusively(
    served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    t0 = int(time.time() * 1000) - 60_000
    run = await sim.new_run(CONV, "alice", "m1")
    await sim.queue(CONV, run, t0)
    await sim.start(CONV, run, t0 + 100)
    ids = [await sim.chunk(CONV, run, f"c{i}", t0 + 200 + 100 * i) for i in range(4)]
    end_id = await sim.end(CONV, run, "completed", t0 + 700)
    everything = backend_bytes(EMPTY, *(chunk(f"c{i}") for i in range(4)))

    assert await resume_body(http, served, CONV, run) == everything  # no cursor: 0-0
    assert await resume_body(http, served, CONV, run, "0-0") == everything
    assert await resume_body(http, served, CONV, run, "0") == everything
    assert await resume_body(http, served, CONV, run, ids[1]) == backend_bytes(
        chunk("c1"), chunk("c2"), chunk("c3")
    )
    ms_only = ids[2].split("-")[0]  # `ms` means `ms-0`
    assert await resume_body(http, served, CONV, run, ms_only) == backend_bytes(chunk("c2"), chunk("c3"))
    assert await resume_body(http, served, CONV, run, ids[3]) == backend_bytes(chunk("c3"))
    assert await resume_body(http, served, CONV, run, end_id) == b""  # the end itself: nothing, at once
    assert await resume_body(http, served, CONV, run, f"{t0 + 99_999}-0") == b""  # past the end


async def test_last_id_then_live_entries_until_end(
    served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    run = await sim.full_run(CONV, "alice", "m1", chunks=2, status=None)
    newest: Any = await sim.client.xrevrange(sim.stream_key(CONV, run), count=1)
    last = newest[0][0].decode()
    received: list[bytes] = []
    async with open_resume(http, served, CONV, run, cursor=last) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-store"
        chunks = response.aiter_bytes()
        received.append(await anext(chunks))  # the replayed last entry, before anything new
        assert received == [backend_bytes(chunk("token 1 "))]
        for i in range(3):
            await sim.chunk(CONV, run, f"live {i} ✓")
            received.append(await anext(chunks))  # each live entry arrives on its own
        writer = asyncio.create_task(sim.end(CONV, run))
        received.extend([c async for c in chunks])
        await writer
    assert b"".join(received) == backend_bytes(chunk("token 1 "), *(chunk(f"live {i} ✓") for i in range(3)))


async def test_stop_ends_the_body_and_a_deleted_key_does_too(
    fast_gone_check: None, served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    stopped = await sim.full_run(CONV, "alice", "m1", chunks=1, status=None)
    deleted = await sim.full_run(CONV, "alice", "m2", chunks=1, status=None)

    async def read(run: str) -> bytes:
        return await resume_body(http, served, CONV, run)

    readers = [asyncio.create_task(read(stopped)), asyncio.create_task(read(deleted))]
    await asyncio.sleep(0.3)
    await sim.stop(CONV, stopped)  # `end`, then the run is deleted: the `end` ends the body
    await sim.client.delete(sim.stream_key(CONV, deleted))  # no `end` at all: the key vanishing does
    bodies = await asyncio.wait_for(asyncio.gather(*readers), 20)
    assert bodies == [backend_bytes(EMPTY, chunk("token 0 "))] * 2


async def test_newline_keepalive_while_silent(
    make_settings: Callable[..., Settings], http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    with serve(make_settings(resume_keepalive_s=0.2)) as served:
        run = await sim.full_run(CONV, "alice", "m1", chunks=1, status=None)
        async with open_resume(http, served, CONV, run) as response:
            chunks = response.aiter_bytes()
            first = await anext(chunks)
            assert await anext(chunks) == b"\n"  # silence: a newline, which the parser skips
            await sim.chunk(CONV, run, "more")
            await sim.end(CONV, run)
            body = first + b"\n" + b"".join([c async for c in chunks])
    assert parse_body(body) == [EMPTY, chunk("token 0 "), chunk("more")]


async def test_a_silent_body_lets_its_client_go_at_once(
    make_settings: Callable[..., Settings], http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    """No keepalive ever writes to it, so only listening for the disconnect frees its place."""
    with serve(make_settings(resume_keepalive_s=0)) as served:
        run = await sim.full_run(CONV, "alice", "m1", chunks=1, status=None)
        async with open_resume(http, served, CONV, run) as response:
            await anext(response.aiter_bytes())
            assert served.sidecar.hub.open == 1
        hub = served.sidecar.hub
        await wait_for(lambda: hub.open == 0 and hub.followed == 0, timeout_s=10)


async def test_refusals_are_flat_json(served: Served, http: httpx.AsyncClient, sim: BackendSimulator) -> None:
    run = await sim.full_run(CONV, "alice", "m1", chunks=1)
    bobs = await sim.full_run(CONV, "bob", "m2", chunks=1)
    cases: list[tuple[str, str, str | None, str | None, int, str]] = [
        (CONV, run, "$", "alice", 400, "Malformed cursor"),
        (CONV, run, "abc", "alice", 400, "Malformed cursor"),
        (CONV, run, "1-2-3", "alice", 400, "Malformed cursor"),
        (CONV, run, "", "alice", 400, "Malformed cursor"),
        (CONV, run, "18446744073709551616-0", "alice", 400, "Malformed cursor"),
        ("bad*id", run, None, "alice", 400, "Malformed conversation id"),
        (CONV, run, None, None, 401, "Missing bearer token"),
        (CONV, "conversation:alice:nope", None, "alice", 404, "Session not found"),
        (CONV, bobs, None, "alice", 404, "Session not found"),  # hidden: exactly as missing
        ("reservation", run, None, "alice", 404, "Session not found"),
    ]
    for conversation, run_id, cursor, user, status, error in cases:
        async with open_resume(http, served, conversation, run_id, cursor, user) as response:
            await response.aread()
            assert response.status_code == status, (run_id, cursor, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["cache-control"] == "no-store"
            assert response.json() == {"error": error, "conversationId": conversation}
    await sim.client.set(sim.stream_key(CONV, "conversation:alice:str"), "not a stream")
    async with open_resume(http, served, CONV, "conversation:alice:str") as response:
        assert response.status_code == 404


async def test_the_body_skips_the_middleware_wrappers_but_not_their_work(
    make_settings: Callable[..., Settings],
    http: httpx.AsyncClient,
    sim: BackendSimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Body messages go past the middleware wrappers (response.BODY_SEND); the start
    message does not, so the CORS headers, the request id and the access line are those of
    any response."""
    origin = "http://page.example"
    run = await sim.full_run(CONV, "alice", "m1", chunks=2, status="completed")
    with (
        caplog.at_level(logging.INFO, logger="session_sidecar.access"),
        serve(make_settings(cors_allowed_origins=origin)) as served,
    ):
        url = served.path(CONV, f"resume/{run}")
        headers = {**auth("alice"), "Origin": origin, "X-Request-ID": "streamed-1"}
        async with http.stream("POST", url, headers=headers) as response:
            body = await response.aread()
        assert parse_body(body) == [EMPTY, chunk("token 0 "), chunk("token 1 ")]
        assert response.headers["access-control-allow-origin"] == origin
        assert "Origin" in response.headers["vary"]
        assert response.headers["x-request-id"] == "streamed-1"

        def logged() -> list[logging.LogRecord]:
            return [r for r in caplog.records if getattr(r, "request_id", None) == "streamed-1"]

        await wait_for(lambda: bool(logged()))  # written once the response has ended
    [line] = logged()
    assert (line.__dict__["method"], line.__dict__["status"], line.__dict__["user_id"]) == (
        "POST",
        200,
        "alice",
    )


async def test_redis_down_is_503_before_and_ends_the_body_after_the_headers(
    make_settings: Callable[..., Settings], http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A body outlives a Redis failure for RESUME_RETRY_S (45 s), shortened here.
    monkeypatch.setattr(endpoints, "RESUME_RETRY_S", 1.0)
    with EmbeddedRedis() as own, serve(make_settings(redis_url=own.url, redis_timeout_ms=300)) as served:
        client = aioredis.Redis.from_url(own.url)
        run = await BackendSimulator(client).full_run(CONV, "alice", "m1", chunks=1, status=None)
        await client.aclose()
        async with open_resume(http, served, CONV, run) as response:
            assert response.status_code == 200
            chunks = response.aiter_bytes()
            assert parse_body(await anext(chunks)) == [EMPTY, chunk("token 0 ")]
            own.stop()
            down = time.monotonic()
            rest = await asyncio.wait_for(rest_of(chunks), 20)  # ends, and properly
        assert rest == b""
        assert time.monotonic() - down >= 1.0
        async with open_resume(http, served, CONV, run) as response:
            await response.aread()
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json() == {"error": "Session store unavailable", "conversationId": CONV}


async def test_shutdown_ends_open_bodies_properly(
    make_settings: Callable[..., Settings], http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    with serve(make_settings(shutdown_timeout_s=1)) as served:
        run = await sim.full_run(CONV, "alice", "m1", chunks=1, status=None)
        async with open_resume(http, served, CONV, run) as response:
            chunks = response.aiter_bytes()
            first = await anext(chunks)
            served.server.should_exit = True  # as on SIGTERM: drained for 1 s, then ended
            started = time.monotonic()
            rest = await asyncio.wait_for(rest_of(chunks), 20)  # no RemoteProtocolError: a clean end
        assert time.monotonic() - started >= 0.9  # the drain period was given
        assert parse_body(first + rest) == [EMPTY, chunk("token 0 ")]
        served.thread.join(10)
        assert not served.thread.is_alive()
        assert served.sidecar.hub.open == 0


async def test_max_streams_is_503_with_retry_after(
    make_settings: Callable[..., Settings], http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    with serve(make_settings(max_streams=2)) as served:
        run = await sim.full_run(CONV, "alice", "m1", chunks=1, status=None)
        async with open_resume(http, served, CONV, run) as one, open_resume(http, served, CONV, run) as two:
            assert one.status_code == two.status_code == 200
            async with open_resume(http, served, CONV, run) as three:
                await three.aread()
                assert three.status_code == 503
                assert three.headers["retry-after"] == "2"
                assert three.json() == {"error": "Too many open streams", "conversationId": CONV}
        await sim.end(CONV, run)
        assert await resume_body(http, served, CONV, run) == backend_bytes(EMPTY, chunk("token 0 "))
        await wait_for(lambda: served.sidecar.hub.open == 0)  # every place given back


async def test_replay_to_live_handover_loses_and_repeats_nothing(
    served: Served, http: httpx.AsyncClient, sim: BackendSimulator
) -> None:
    """Clients join at random moments while entries are written as fast as Redis takes them:
    the hand-over from the replay to the hub must neither drop nor repeat one."""
    run = await sim.new_run(CONV, "alice", "m1")
    await sim.start(CONV, run)
    total = 300

    async def write() -> None:
        for i in range(total):
            await sim.chunk(CONV, run, f"c{i}")
            if i % 10 == 0:
                await asyncio.sleep(0)
        await sim.end(CONV, run)

    async def read(delay_s: float) -> list[Any]:
        await asyncio.sleep(delay_s)
        return parse_body(await resume_body(http, served, CONV, run))

    readers = [asyncio.create_task(read(i * 0.01)) for i in range(30)]
    await write()
    for objects in await asyncio.wait_for(asyncio.gather(*readers), 60):
        assert [o["message"] for o in objects] == [f"c{i}" for i in range(total)]


async def test_redis_connections_do_not_grow_with_clients(
    make_settings: Callable[..., Settings], http: httpx.AsyncClient
) -> None:
    """200 clients following 20 live runs: the hub's two connections and the pool, no more."""
    with EmbeddedRedis() as own, serve(make_settings(redis_url=own.url)) as served:
        writer = aioredis.Redis.from_url(own.url, client_name="test-writer")
        sim = BackendSimulator(writer)
        runs = [await sim.full_run(CONV, "alice", f"m{i}", chunks=1, status=None) for i in range(20)]
        responses: list[httpx.Response] = []
        async with contextlib.AsyncExitStack() as stack:
            for i in range(200):
                response = await stack.enter_async_context(open_resume(http, served, CONV, runs[i % 20]))
                assert response.status_code == 200
                responses.append(response)
            streams = [r.aiter_bytes() for r in responses]
            for stream in streams:
                assert parse_body(await anext(stream)) == [EMPTY, chunk("token 0 ")]
            for run in runs:
                await sim.chunk(CONV, run, "live")
            for stream in streams:
                assert parse_body(await anext(stream)) == [chunk("live")]  # fanned out to all 200
            clients: Any = await writer.client_list()
            sidecar = [c for c in clients if c["name"] != "test-writer"]
            hub = [c for c in sidecar if c["name"] == HUB_CLIENT_NAME]
            assert len(hub) == 2
            assert len(sidecar) <= MAX_CONNECTIONS + 4, len(sidecar)
            assert served.sidecar.hub.open == 200
            for run in runs:
                await sim.end(CONV, run)
            for stream in streams:
                assert [c async for c in stream] == []
        await writer.aclose()


# --- the pure functions behind the bytes, without I/O -----------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    content=st.text(),
    citations=st.lists(json_values, max_size=3),
    tool_calls=st.lists(json_values, max_size=3),
    thinking=st.none() | st.text(),
)
def test_resume_bytes_are_json_dumps_for_any_text(
    content: str, citations: list[Any], tool_calls: list[Any], thinking: str | None
) -> None:
    fields = {
        "type": "chunk",
        "content": content,
        "citations_json": json.dumps(citations),
        "tool_calls_json": json.dumps(tool_calls, ensure_ascii=False),
    }
    if thinking is not None:
        fields["thinking"] = thinking
    expected = {"message": content, "citations": citations, "tool_calls": tool_calls, "thinking": thinking}
    assert wire.resume_bytes(fields) == json.dumps(expected).encode()


@given(content=st.text(), thinking=st.none() | st.text(), listed=st.booleans())
def test_resume_bytes_of_a_plain_chunk_are_json_dumps(
    content: str, thinking: str | None, listed: bool
) -> None:
    """The usual chunk, no citation and no tool call (`[]`, or no field at all), which
    `resume_bytes` puts together itself rather than through `json.dumps`."""
    fields = {"type": "chunk", "content": content}
    if listed:
        fields |= {"citations_json": "[]", "tool_calls_json": "[]"}
    if thinking is not None:
        fields["thinking"] = thinking
    expected: dict[str, Any] = {"message": content, "citations": [], "tool_calls": [], "thinking": thinking}
    assert wire.resume_bytes(fields) == json.dumps(expected).encode()


def test_bytes_that_are_not_utf8_become_replacement_characters() -> None:
    """Never a crash (SPEC 4), whichever fields an entry's wire form decodes."""
    plain = wire.decode_entry(b"1-0", {b"type": b"chunk", b"content": b"ok \xff"})
    assert plain.resume_bytes == json.dumps(chunk("ok \ufffd")).encode()
    cited = wire.decode_entry(b"2-0", [b"type", b"chunk", b"content", b"\xfe", b"citations_json", b'["a"]'])
    assert cited.resume_bytes == json.dumps(chunk("\ufffd", ["a"])).encode()
    assert cited.fields["content"] == "\ufffd" and cited.sid == (2, 0) and cited.type == "chunk"


def test_stream_ids_parse_as_redis_reads_them() -> None:
    assert wire.parse_id("0-0") == (0, 0)
    assert wire.parse_id("1700000000000") == (1700000000000, 0)
    assert wire.parse_id("18446744073709551615-18446744073709551615") == (2**64 - 1, 2**64 - 1)
    arabic_indic = "\u0661-\u0660"  # digits to Python's `\\d`, not to Redis
    for bad in ("", "$", "-", "1-", "-1", "1-2-3", " 1-0", "1-0 ", "+", arabic_indic, "18446744073709551616"):
        assert wire.parse_id(bad) is None, bad
    assert wire.successor((5, 2**64 - 1)) == (6, 0) and wire.successor((5, 1)) == (5, 2)
    assert wire.before((5, 0)) == (4, 2**64 - 1) and wire.before((5, 3)) == (5, 2)
    assert wire.before(wire.ZERO) == wire.ZERO  # 0-0 is never an entry: "from 0-0" is "after 0-0"
