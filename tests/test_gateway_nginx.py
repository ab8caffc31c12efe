"""The reference gateway (deploy/nginx/sidecar-gateway.conf) under real nginx.

One stack per module, all on loopback (tests/gateway_helpers.py): the real
sidecar app (HS256 tokens, the session Redis, the `run-owner` policy) wrapped
in a recorder of every request it receives, a stub backend that echoes what it
received as JSON, and nginx including the repository file unchanged.

The only thing the test supplies is what the gateway file leaves to its
includer: the `listen` address and the addresses of the upstream groups
`session_sidecar` and `chat_backend`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis
import redis.asyncio as aioredis

from session_sidecar.embedded import free_port
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.gateway_helpers import (
    BLOCK,
    DOWNLOAD_BLOCKS,
    GATEWAY_CONF,
    Backend,
    Nginx,
    Sidecar,
    nginx_binary,
    start_backend,
    start_nginx,
    start_sidecar,
)
from tests.streaming import parse_sse, sse_events

PREFIX = "/api/v1"
OPERATIONAL = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
CANONICAL_SIDECAR_PATH = re.compile(
    r"/api/v1/conversations/[A-Za-z0-9._-]+/(active-session|task-status|events|resume/[A-Za-z0-9._:-]+)"
)
CONVERSATION = "gw-conv-1"
RUN_ID = "conversation:alice:msg-gw"
SECRET = "gateway-test-secret-long-enough-for-hs256"
# The sidecar's default allowed origin (the backend's own default, SPEC section 5).
FRONTEND_ORIGIN = "http://localhost:3000"


# --- a client that sends the path exactly as written -------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def get(port: int, raw_path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Answer:
    # http.client sends the request target verbatim: no `..` resolution, no re-encoding.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, raw_path, headers=headers or {})
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


# --- fixtures -----------------------------------------------------------------------------------


@dataclass
class Stack:
    sidecar: Sidecar
    backend: Backend
    nginx: Nginx


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    nginx_binary()
    client = redis.Redis.from_url(redis_url)
    client.delete(f"chat:stream:{CONVERSATION}:{RUN_ID}", f"task:status:{CONVERSATION}:{RUN_ID}")
    # One live run of alice's, written as the backend writes it.
    client.xadd(
        f"chat:stream:{CONVERSATION}:{RUN_ID}",
        {
            "type": "start",
            "conversation_id": CONVERSATION,
            "run_id": RUN_ID,
            "created_at": "2026-01-01T00:00:00",
            "agent_id": "agent-1",
            "status": "processing",
            "message": "started",
        },
    )
    client.expire(f"chat:stream:{CONVERSATION}:{RUN_ID}", 900)
    client.set(f"task:status:{CONVERSATION}:{RUN_ID}", "running", ex=600)
    client.close()

    sidecar = start_sidecar(
        {"SIDECAR_REDIS_URL": redis_url, "SIDECAR_JWT_SECRET": SECRET, "SIDECAR_ACCESS_POLICY": "run-owner"}
    )
    backend = start_backend()
    nginx = start_nginx(
        tmp_path_factory.mktemp("nginx"), f"127.0.0.1:{sidecar.port}", f"127.0.0.1:{backend.port}"
    )
    try:
        yield Stack(sidecar, backend, nginx)
    finally:
        nginx.stop()
        backend.stop()
        sidecar.stop()


def alice() -> dict[str, str]:
    claims = {"user_id": "alice", "sub": "alice", "exp": int(time.time()) + 300}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


# --- routing --------------------------------------------------------------------------------------


def test_the_gateway_file_is_included_unchanged(stack: Stack) -> None:
    conf = (stack.nginx.workdir / "nginx.conf").read_text()
    assert f"include {GATEWAY_CONF};" in conf
    # Nothing in the generated part routes a sidecar path: that comes from the file alone.
    assert "session_sidecar" not in conf.split("server {", 1)[1]


@pytest.mark.parametrize("endpoint", ["active-session", "task-status"])
def test_both_sidecar_paths_reach_the_sidecar(stack: Stack, endpoint: str) -> None:
    before, backend_before = len(stack.sidecar.recorder.seen), len(stack.backend.seen)
    answer = get(stack.nginx.port, f"{PREFIX}/conversations/{CONVERSATION}/{endpoint}", alice())
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["conversationId"] == CONVERSATION
    assert body["sessionId"] == RUN_ID
    assert answer.headers["cache-control"] == "no-store"
    assert [s.path for s in stack.sidecar.recorder.seen[before:]] == [
        f"{PREFIX}/conversations/{CONVERSATION}/{endpoint}"
    ]
    assert len(stack.backend.seen) == backend_before


def test_query_string_is_passed_to_the_sidecar(stack: Stack) -> None:
    before = len(stack.sidecar.recorder.seen)
    answer = get(stack.nginx.port, f"{PREFIX}/conversations/{CONVERSATION}/task-status?x=1&y=2", alice())
    assert answer.status == 200
    (seen,) = stack.sidecar.recorder.seen[before:]
    assert seen.raw_path == f"{PREFIX}/conversations/{CONVERSATION}/task-status".encode()


@pytest.mark.parametrize(
    "path",
    [
        f"{PREFIX}/conversations/{CONVERSATION}/message/",
        f"{PREFIX}/conversations/{CONVERSATION}/info/",
        f"{PREFIX}/conversations/{CONVERSATION}/",
        f"{PREFIX}/conversations/{CONVERSATION}/active-session/",  # not the exact sidecar path
        f"{PREFIX}/conversations/{CONVERSATION}/active-sessions",
        f"{PREFIX}/conversations/a/b/task-status",
        f"{PREFIX}/conversations/x%2Fy/message/?q=%2F",  # the backend gets the raw URI
        f"{PREFIX}/conversations/{CONVERSATION}/events/",
        f"{PREFIX}/conversations/{CONVERSATION}/eventsource",
        f"{PREFIX}/conversations/{CONVERSATION}/resume/",
        f"{PREFIX}/conversations/{CONVERSATION}/resume/a/b",
    ],
)
def test_neighbouring_paths_reach_the_backend(stack: Stack, path: str) -> None:
    before = len(stack.sidecar.recorder.seen)
    answer = get(stack.nginx.port, path, alice())
    assert answer.status == 200, answer.body
    body = answer.json()
    assert body["who"] == "backend"
    assert body["path"] == path
    assert stack.sidecar.recorder.seen[before:] == []


def test_paths_outside_the_prefix_are_not_routed(stack: Stack) -> None:
    before = len(stack.sidecar.recorder.seen)
    for path in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/api/v2/conversations/x/active-session",
    ):
        answer = get(stack.nginx.port, path)
        assert answer.status == 404, path
        assert answer.body == b"gateway: no route\n"
    assert stack.sidecar.recorder.seen[before:] == []


# --- headers --------------------------------------------------------------------------------------


def test_authorization_passes_through_to_both(stack: Stack) -> None:
    headers = alice()
    answer = get(stack.nginx.port, f"{PREFIX}/conversations/{CONVERSATION}/info/", headers)
    assert answer.json()["headers"]["authorization"] == headers["Authorization"]

    before = len(stack.sidecar.recorder.seen)
    ok = get(stack.nginx.port, f"{PREFIX}/conversations/{CONVERSATION}/active-session", headers)
    assert ok.status == 200
    assert stack.sidecar.recorder.seen[before].headers["authorization"] == headers["Authorization"]
    # Without the header the sidecar itself says 401: nginx did not invent one.
    missing = get(stack.nginx.port, f"{PREFIX}/conversations/{CONVERSATION}/active-session")
    assert missing.status == 401
    assert missing.json()["conversationId"] == CONVERSATION
    assert "authorization" not in stack.sidecar.recorder.seen[-1].headers


def test_request_id_is_set_when_absent_and_kept_when_present(stack: Stack) -> None:
    info = f"{PREFIX}/conversations/{CONVERSATION}/info/"
    generated = get(stack.nginx.port, info).json()["headers"]["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert get(stack.nginx.port, info).json()["headers"]["x-request-id"] != generated
    kept = get(stack.nginx.port, info, {"X-Request-ID": "client-chosen-42"})
    assert kept.json()["headers"]["x-request-id"] == "client-chosen-42"

    sidecar_path = f"{PREFIX}/conversations/{CONVERSATION}/task-status"
    get(stack.nginx.port, sidecar_path, alice())
    assert re.fullmatch(r"[0-9a-f]{32}", stack.sidecar.recorder.seen[-1].headers["x-request-id"])
    get(stack.nginx.port, sidecar_path, {**alice(), "X-Request-ID": "client-chosen-43"})
    assert stack.sidecar.recorder.seen[-1].headers["x-request-id"] == "client-chosen-43"


# --- CORS: the sidecar answers it, the gateway passes it on ---------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "method"),
    [("active-session", "GET"), ("task-status", "GET"), ("events", "GET"), (f"resume/{RUN_ID}", "POST")],
)
def test_a_preflight_reaches_the_sidecar_and_gets_its_cors_answer(
    stack: Stack, endpoint: str, method: str
) -> None:
    before, backend_before = len(stack.sidecar.recorder.seen), len(stack.backend.seen)
    path = f"{PREFIX}/conversations/{CONVERSATION}/{endpoint}"
    # What a browser sends before a request with an Authorization header: no token.
    preflight = {
        "Origin": FRONTEND_ORIGIN,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization",
    }
    answer = get(stack.nginx.port, path, preflight, method="OPTIONS")
    assert answer.status == 200, answer.body
    assert answer.headers["access-control-allow-origin"] == FRONTEND_ORIGIN
    assert answer.headers["access-control-allow-credentials"] == "true"
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    assert [(s.method, s.path) for s in stack.sidecar.recorder.seen[before:]] == [("OPTIONS", path)]
    assert len(stack.backend.seen) == backend_before


def test_a_cross_origin_get_through_the_gateway_carries_cors_headers(stack: Stack) -> None:
    path = f"{PREFIX}/conversations/{CONVERSATION}/active-session"
    answer = get(stack.nginx.port, path, {**alice(), "Origin": FRONTEND_ORIGIN})
    assert answer.status == 200, answer.body
    assert answer.json()["sessionId"] == RUN_ID
    assert answer.headers["access-control-allow-origin"] == FRONTEND_ORIGIN
    assert answer.headers["access-control-allow-credentials"] == "true"
    exposed = [h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")]
    assert "etag" in exposed


# --- streaming ------------------------------------------------------------------------------------


def test_streamed_events_arrive_one_by_one(stack: Stack) -> None:
    backend = stack.backend
    backend.release.clear()
    backend.sent_last.clear()
    conn = http.client.HTTPConnection("127.0.0.1", stack.nginx.port, timeout=5)
    try:
        conn.request(
            "GET", f"{PREFIX}/conversations/{CONVERSATION}/stream/", headers={"Accept-Encoding": "gzip"}
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("X-Accel-Buffering") is None
        # gzip would hold bytes back until its buffer fills: the gateway turns it off here.
        assert resp.getheader("Content-Encoding") is None
        # The first event must arrive while the backend is still holding the last one back.
        # A buffering gateway keeps it until the response ends: this read then times out.
        try:
            first = resp.read1(65536)
        except TimeoutError:
            pytest.fail("the first event did not arrive before the stream ended: the gateway buffers")
        assert first == b"data: first\n\n"
        assert not backend.sent_last.is_set()
        backend.release.set()
        assert resp.read() == b"data: last\n\n"
    finally:
        backend.release.set()
        conn.close()


def test_the_gateway_does_not_absorb_a_response_the_client_is_not_reading(stack: Stack) -> None:
    # Unbuffered proxying passes the backend's bytes on as the client takes them, so a client that
    # does not read holds the backend back. A buffering gateway (`proxy_buffering on`, or one that
    # obeys the backend's `X-Accel-Buffering: yes`) swallows the whole answer into its buffers.
    backend = stack.backend
    backend.download_done.clear()
    conn = http.client.HTTPConnection("127.0.0.1", stack.nginx.port, timeout=10)
    try:
        conn.request("GET", f"{PREFIX}/conversations/{CONVERSATION}/download/")
        resp = conn.getresponse()
        assert resp.status == 200
        assert int(resp.getheader("Content-Length") or 0) == DOWNLOAD_BLOCKS * len(BLOCK)
        assert not backend.download_done.wait(timeout=2.0), "the gateway buffered the whole response"
        assert len(resp.read(len(BLOCK))) == len(BLOCK)
    finally:
        conn.close()


def test_websocket_upgrades_reach_the_backend(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.nginx.port), timeout=5) as sock:
        sock.sendall(
            f"GET {PREFIX}/conversations/{CONVERSATION}/ws/ HTTP/1.1\r\nHost: gw\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            assert data, head
            head += data
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(b"ping through the tunnel\n")
        echoed = head.split(b"\r\n\r\n", 1)[1]
        while not echoed.endswith(b"\n"):
            data = sock.recv(4096)
            assert data, echoed
            echoed += data
        assert echoed == b"ping through the tunnel\n"


# --- the streamed sidecar endpoints: resume and events --------------------------------------------

STREAMS_CONVERSATION = "gw-conv-streams"
QUEUED = json.dumps({"message": "", "citations": [], "tool_calls": [], "thinking": None}).encode()


def resume_object(message: str) -> bytes:
    """What the backend's resume route writes for a chunk: Python's `json.dumps`, default arguments."""
    return json.dumps({"message": message, "citations": [], "tool_calls": [], "thinking": None}).encode()


@pytest.fixture
async def writer(redis_url: str) -> AsyncIterator[BackendSimulator]:
    # Not conftest's `sim`: that one flushes the database, and the module's stack keeps a run in it.
    client = aioredis.Redis.from_url(redis_url)
    yield BackendSimulator(client)
    await client.aclose()


async def live_run(writer: BackendSimulator) -> str:
    run_id = await writer.new_run(STREAMS_CONVERSATION, "alice", uuid.uuid4().hex[:12])
    await writer.queue(STREAMS_CONVERSATION, run_id)
    await writer.start(STREAMS_CONVERSATION, run_id)
    return run_id


def gateway_url(stack: Stack, tail: str) -> str:
    return f"http://127.0.0.1:{stack.nginx.port}{PREFIX}/conversations/{STREAMS_CONVERSATION}/{tail}"


async def read_until(chunks: AsyncIterator[bytes], got: bytearray, wanted: bytes, what: str) -> None:
    try:
        async with asyncio.timeout(5):
            while not got.endswith(wanted):
                got += await anext(chunks)
    except TimeoutError:
        pytest.fail(f"{what} did not arrive while the run was being written: the gateway buffers ({got!r})")


async def test_a_resume_through_the_gateway_streams_entries_as_they_are_written(
    stack: Stack, writer: BackendSimulator
) -> None:
    run_id = await live_run(writer)
    await writer.chunk(STREAMS_CONVERSATION, run_id, 'Hello ✓ 🎉 "quoted"\n')
    # Every header of the frontend's fetch, gzip included: the production http block may compress.
    headers = {**alice(), "Accept-Encoding": "gzip"}
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("POST", gateway_url(stack, f"resume/{run_id}"), headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert "content-encoding" not in response.headers
        chunks = response.aiter_raw()
        got = bytearray()
        # The replay, then each live entry, each before the next one is even written.
        await read_until(chunks, got, QUEUED + resume_object('Hello ✓ 🎉 "quoted"\n'), "the replay")
        for word in ("second ", "third "):
            await writer.chunk(STREAMS_CONVERSATION, run_id, word)
            await read_until(chunks, got, resume_object(word), f"the live chunk {word!r}")
        await writer.end(STREAMS_CONVERSATION, run_id)
        async with asyncio.timeout(5):  # `end`: the body ends, and nothing more is in it
            async for piece in chunks:
                got += piece
    expected = QUEUED + b"".join(resume_object(m) for m in ('Hello ✓ 🎉 "quoted"\n', "second ", "third "))
    assert bytes(got) == expected


@pytest.mark.parametrize("spelling", ["raw", "percent-encoded"])
async def test_a_resume_reaches_the_sidecar_with_the_run_ids_colons_and_the_cursor(
    stack: Stack, writer: BackendSimulator, spelling: str
) -> None:
    start_ms = int(time.time() * 1000) - 60_000
    run_id = await writer.full_run(STREAMS_CONVERSATION, "alice", uuid.uuid4().hex[:12], start_ms=start_ms)
    assert run_id.count(":") == 2
    ids: Any = await writer.client.xrange(writer.stream_key(STREAMS_CONVERSATION, run_id))
    second_chunk = ids[3][0].decode()  # queued, start, chunk 0, chunk 1, chunk 2, end
    in_path = run_id if spelling == "raw" else run_id.replace(":", "%3A")
    path = f"{PREFIX}/conversations/{STREAMS_CONVERSATION}/resume/{in_path}?cursor={second_chunk}"
    before = len(stack.sidecar.recorder.seen)
    answer = await asyncio.to_thread(get, stack.nginx.port, path, alice(), "POST")
    assert answer.status == 200, answer.body
    # Inclusive from the cursor, which only a cursor that reached the sidecar can produce.
    assert answer.body == resume_object("token 1 ") + resume_object("token 2 ")
    (seen,) = stack.sidecar.recorder.seen[before:]
    canonical = f"{PREFIX}/conversations/{STREAMS_CONVERSATION}/resume/{run_id}"
    assert (seen.method, seen.path, seen.raw_path) == ("POST", canonical, canonical.encode())


def test_a_run_id_the_gateway_cannot_rebuild_cleanly_goes_to_the_backend(stack: Stack) -> None:
    # A space (or `%`, `?`, `/`) in the run id: not passed on through a rebuilt path, but the
    # backend still serves its own resume route.
    before = len(stack.sidecar.recorder.seen)
    path = f"{PREFIX}/conversations/{CONVERSATION}/resume/conversation:a%20b:m"
    answer = get(stack.nginx.port, path, alice(), method="POST")
    assert answer.status == 200, answer.body
    assert (answer.json()["who"], answer.json()["method"], answer.json()["path"]) == ("backend", "POST", path)
    assert stack.sidecar.recorder.seen[before:] == []


async def next_event(events: AsyncIterator[dict[str, Any]], what: str) -> dict[str, Any]:
    try:
        async with asyncio.timeout(5):
            return await anext(events)
    except TimeoutError:
        pytest.fail(f"{what} did not arrive while the run was being written: the gateway buffers")


async def test_events_stream_through_the_gateway_and_resume_from_last_event_id(
    stack: Stack, writer: BackendSimulator
) -> None:
    run_id = await live_run(writer)
    first = await writer.chunk(STREAMS_CONVERSATION, run_id, "one")
    url, params = gateway_url(stack, "events"), {"run_id": run_id}
    async with httpx.AsyncClient(timeout=10) as http:
        headers = {**alice(), "Accept-Encoding": "gzip"}
        async with http.stream("GET", url, params=params, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert "content-encoding" not in response.headers
            events = sse_events(response)
            assert await next_event(events, "retry") == {"retry": "2000"}
            replayed = [await next_event(events, "the replay") for _ in range(3)]
            assert [e["event"] for e in replayed] == ["queued", "start", "chunk"]
            assert replayed[2]["id"] == first
            second = await writer.chunk(STREAMS_CONVERSATION, run_id, "two")
            live = await next_event(events, "a live chunk")
            assert (live["id"], live["event"]) == (second, "chunk")
            assert json.loads(live["data"])["message"] == "two"
            end = await writer.end(STREAMS_CONVERSATION, run_id)
            async with asyncio.timeout(5):
                rest = [event async for event in events]
            assert [(e["id"], e["event"]) for e in rest] == [(end, "end")]
        # An EventSource reconnects with Last-Event-ID, which the gateway passes on.
        headers = {**alice(), "Last-Event-ID": first}
        again = await http.get(url, params=params, headers=headers)
        assert again.status_code == 200
        assert [e.get("id") for e in parse_sse(again.text)] == [None, second, end]  # `retry` first
        after_end = await http.get(url, params=params, headers={**alice(), "Last-Event-ID": end})
        assert after_end.status_code == 204


def test_every_sidecar_location_outwaits_a_watch_and_a_keepalive() -> None:
    # nginx closes an upstream connection silent for longer than proxy_read_timeout: a held watch,
    # or a stream between two keepalives, must never be that silent.
    defaults = Settings()
    longest_silence = max(defaults.watch_max_s, defaults.resume_keepalive_s, defaults.sse_keepalive_s)
    blocks = re.findall(r"^location ~ [^\n]*\{\n(.*?)^\}", GATEWAY_CONF.read_text(), re.M | re.S)
    assert len(blocks) == 2
    for block in blocks:
        assert "proxy_pass http://session_sidecar/" in block
        assert "proxy_buffering off;" in block
        (read_timeout,) = re.findall(r"^\s*proxy_read_timeout (\d+)s;", block, re.M)
        assert int(read_timeout) > longest_silence


# --- tricks -------------------------------------------------------------------------------------

TRICKS = [
    f"{PREFIX}/conversations/x/active-session/../../../../healthz",
    f"{PREFIX}/conversations/x/task-status/../../../../metrics",
    f"{PREFIX}/conversations/..%2F..%2Fmetrics/active-session",
    f"{PREFIX}/conversations/..%2F..%2F..%2Fhealthz/task-status",
    f"{PREFIX}/conversations/x%2Factive-session",
    f"{PREFIX}/conversations/x/active-session%2F..%2F..%2Fmetrics",
    f"{PREFIX}/conversations/x/active-session%2F..%2F..%2F..%2F..%2Freadyz",
    f"{PREFIX}/conversations/%2E%2E/%2E%2E/%2E%2E/openapi.json",
    f"{PREFIX}/conversations/x/active-session%0A",
    f"{PREFIX}/conversations/x/active-session%00",
    f"{PREFIX}/conversations/x/active-session;/../../../../metrics",
    f"{PREFIX}/conversations/x/active-session%3F/../../../../metrics",
    "/metrics/../api/v1/conversations/x/active-session",
    "/healthz/..%2Fapi/v1/conversations/x/task-status",
    f"//{PREFIX.lstrip('/')}//conversations//x//active-session",
    f"{PREFIX}/conversations/x%2F..%2F..%2F..%2F..%2Fmetrics%23/active-session",
    f"{PREFIX}/conversations/x/resume/a/../../../../../healthz",
    f"{PREFIX}/conversations/x/resume/..%2F..%2F..%2F..%2F..%2Fmetrics",
    f"{PREFIX}/conversations/x/resume/a:b%2F..%2F..%2F..%2F..%2F..%2Freadyz",
    f"{PREFIX}/conversations/x/resume/a:b%0A",
    f"{PREFIX}/conversations/x/resume/a:b%3F/../../../../../metrics",
    f"{PREFIX}/conversations/x/events/../../../../healthz",
    f"{PREFIX}/conversations/x/events%2F..%2F..%2F..%2F..%2Fmetrics",
]


@pytest.mark.parametrize("trick", TRICKS)
def test_tricks_never_reach_operational_endpoints(stack: Stack, trick: str) -> None:
    before = len(stack.sidecar.recorder.seen)
    answer = get(stack.nginx.port, trick, alice())
    seen = stack.sidecar.recorder.seen[before:]
    for request in seen:
        assert request.path not in OPERATIONAL, trick
        # Whatever reaches the sidecar is one canonical conversation path, nothing more.
        assert CANONICAL_SIDECAR_PATH.fullmatch(request.path), (trick, request.path)
        assert request.raw_path == request.path.encode(), (trick, request.raw_path)
    assert not answer.body.startswith(b"# HELP"), trick
    assert b'"openapi"' not in answer.body, trick


def test_the_trick_check_can_see_operational_requests(stack: Stack) -> None:
    # The recorder is not blind: a direct request to the sidecar is seen and served.
    before = len(stack.sidecar.recorder.seen)
    metrics = get(stack.sidecar.port, "/metrics")
    assert metrics.status == 200
    assert b"# HELP" in metrics.body or b"# TYPE" in metrics.body
    assert get(stack.sidecar.port, "/healthz").status == 200
    assert [s.path for s in stack.sidecar.recorder.seen[before:]] == ["/metrics", "/healthz"]


# --- sidecar down -------------------------------------------------------------------------------


def test_unreachable_sidecar_is_a_json_503_not_a_404(stack: Stack, tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there
    nginx = start_nginx(tmp_path / "nginx-dead", f"127.0.0.1:{dead}", f"127.0.0.1:{stack.backend.port}")
    try:
        # The frontend takes any non-2xx resume for "could not resume", never for an empty answer.
        for endpoint, method in (("active-session", "GET"), ("events", "GET"), (f"resume/{RUN_ID}", "POST")):
            path = f"{PREFIX}/conversations/{CONVERSATION}/{endpoint}"
            answer = get(nginx.port, path, alice(), method=method)
            assert answer.status == 503, endpoint
            assert answer.headers["content-type"] == "application/json"
            assert answer.headers["cache-control"] == "no-store"
            assert int(answer.headers["retry-after"]) > 0
            assert answer.json() == {"error": "Session service unavailable", "conversationId": CONVERSATION}
        # The backend is unaffected.
        assert get(nginx.port, f"{PREFIX}/conversations/{CONVERSATION}/info/").json()["who"] == "backend"
    finally:
        nginx.stop()
