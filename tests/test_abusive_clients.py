"""Slow and abusive clients against the service under a real uvicorn, configured as `serve`
configures it (`cli.uvicorn_config`, `httpguard.py`): thousands of idle sockets, request
heads too large or trickled a byte at a time, and streamed responses nobody reads. All the
while a steady client asks both endpoints, and every answer must be the right one within
the budget (plus a margin for two shared cores); and each abuser is let go of in time.

The timeouts are shortened here (seconds, not the production tens of seconds); the sizes
are the production ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest
import redis.asyncio as aioredis

from session_sidecar import cli, httpguard
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import token
from tests.streaming import Served, http_client, open_resume, serve
from tests.test_index import wait_for

BUDGET_MS = 500
MARGIN_S = 1.0
HEAD_TIMEOUT_S = 1.0
KEEP_ALIVE_S = 1
WRITE_STALL_S = 1.0
CONV = "conv-abused"


@pytest.fixture
def short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpguard, "HEAD_TIMEOUT_S", HEAD_TIMEOUT_S)
    monkeypatch.setattr(httpguard, "WRITE_STALL_S", WRITE_STALL_S)
    monkeypatch.setattr(cli, "KEEP_ALIVE_S", KEEP_ALIVE_S)


@dataclass
class Steady:
    """One well-behaved client asking both endpoints of a conversation, over and over."""

    served: Served
    run_id: str
    answers: list[tuple[int, str | None, float]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {token('alice')}"}
        async with httpx.AsyncClient(timeout=30) as http:
            while not self._stop.is_set():
                for endpoint in ("active-session", "task-status"):
                    started = time.monotonic()
                    response = await http.get(self.served.path(CONV, endpoint), headers=headers)
                    session = response.json().get("sessionId") if response.status_code == 200 else None
                    self.answers.append((response.status_code, session, time.monotonic() - started))
                await asyncio.sleep(0.02)

    def check(self) -> str:
        assert len(self.answers) > 20, "the steady client hardly asked"
        wrong = [a for a in self.answers if a[:2] != (200, self.run_id)]
        assert not wrong, f"wrong answers: {wrong[:5]}"
        slowest = max(a[2] for a in self.answers)
        assert slowest < BUDGET_MS / 1000 + MARGIN_S, f"slowest {slowest * 1000:.0f} ms"
        return f"{len(self.answers)} right answers, slowest {slowest * 1000:.0f} ms"


@contextlib.asynccontextmanager
async def steady_client(served: Served, run_id: str) -> AsyncIterator[Steady]:
    steady = Steady(served, run_id)
    task = asyncio.create_task(steady.run())
    try:
        yield steady
    finally:
        steady._stop.set()
        await task


@pytest.fixture
async def world(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, short_timeouts: None
) -> AsyncIterator[tuple[Served, str, BackendSimulator]]:
    sim = BackendSimulator(redis_client)
    run_id = await sim.full_run(CONV, "alice", "m", status=None)
    with serve(make_settings(index_mode="auto", redis_timeout_ms=BUDGET_MS)) as served:
        yield served, run_id, sim


def port_of(served: Served) -> int:
    return int(served.url.rsplit(":", 1)[1])


async def closed_by_server(reader: asyncio.StreamReader, within_s: float) -> bool:
    """The server closed the connection (EOF or reset) within `within_s`."""
    return await bytes_until_closed(reader, within_s) is not None


async def bytes_until_closed(reader: asyncio.StreamReader, within_s: float) -> int | None:
    """How many bytes came before the server closed the connection; None if it did not
    within `within_s`."""
    received = 0
    try:
        async with asyncio.timeout(within_s):
            while data := await reader.read(65536):
                received += len(data)
    except TimeoutError:
        return None
    except ConnectionError:
        pass
    return received


def sockets_allowed(wanted: int) -> int:
    """`wanted`, or fewer if the open-file limit is lower than both ends of that many
    sockets (both are in this process) need; the soft limit is raised first if it may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + 512
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return wanted if soft == resource.RLIM_INFINITY else min(wanted, (soft - 512) // 2)


async def test_idle_sockets_are_closed_and_starve_no_one(world: tuple[Served, str, BackendSimulator]) -> None:
    served, run_id, _ = world
    port = port_of(served)
    count = sockets_allowed(1500)
    async with steady_client(served, run_id) as steady:
        # Sockets that never send a byte, and sockets kept alive after one request.
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count * 2 // 3)]
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count // 3)]
        for _, writer in idle:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\n\r\n")
        for reader, _ in idle:
            assert (await reader.readuntil(b'"ok"}')).startswith(b"HTTP/1.1 200")
        opened = time.monotonic()
        closed = await asyncio.gather(
            *(closed_by_server(r, HEAD_TIMEOUT_S + KEEP_ALIVE_S + MARGIN_S) for r, _ in silent + idle)
        )
        waited = time.monotonic() - opened
    for _, writer in silent + idle:
        writer.close()
    print(
        f"{len(silent)} silent and {len(idle)} idle kept-alive sockets, all closed in {waited:.1f} s; "
        f"{steady.check()}"
    )
    assert all(closed), f"{closed.count(False)} of {len(closed)} sockets still open"


async def send_slowly(port: int, head: bytes, every_s: float) -> bool:
    """A request head trickled a byte at a time; True if the server hung up before its end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(len(head)):
            writer.write(head[i : i + 1])
            await writer.drain()
            if reader.at_eof():
                return True
            await asyncio.sleep(every_s)
        return False
    except ConnectionError:
        return True
    finally:
        writer.close()


async def send_head(port: int, head: bytes) -> bytes:
    """Sends a whole request head (however large); the status line answered, or b"" if the
    server hung up without one (a reset while this was still sending)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(0, len(head), 1 << 20):
            writer.write(head[i : i + (1 << 20)])
            await writer.drain()
        return await reader.readline()
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_oversized_and_trickled_heads_are_refused(world: tuple[Served, str, BackendSimulator]) -> None:
    served, run_id, _ = world
    port = port_of(served)
    path = f"/api/v1/conversations/{CONV}/task-status"
    start = f"GET {path} HTTP/1.1\r\nHost: sidecar\r\nAuthorization: Bearer {token('alice')}\r\n".encode()
    async with steady_client(served, run_id) as steady:
        # Just under the limit: a legitimate (if bloated) request is answered.
        padding = b"a" * (httpguard.HEAD_MAX_BYTES - 1024)
        fits = await send_head(port, start + b"X-Pad: " + padding + b"\r\n\r\n")
        huge = await send_head(port, start + b"X-Big: " + b"a" * 50_000_000 + b"\r\n\r\n")
        lines = await send_head(port, start + b"".join(b"X-%d: v\r\n" % i for i in range(100_000)) + b"\r\n")
        began = time.monotonic()
        cut = await send_slowly(port, start + b"X-Slow: " + b"a" * 100 + b"\r\n\r\n", every_s=0.05)
        trickled_s = time.monotonic() - began
    print(
        f"heads: {len(start) + len(padding) + 12} bytes {fits!r}; 50 MB header {huge!r}; "
        f"100,000 header lines {lines!r}; trickled head cut after {trickled_s:.1f} s; {steady.check()}"
    )
    assert fits.startswith(b"HTTP/1.1 200")
    assert huge in (b"", b"HTTP/1.1 400 Bad Request\r\n")
    assert lines in (b"", b"HTTP/1.1 400 Bad Request\r\n")
    assert cut and trickled_s < HEAD_TIMEOUT_S + MARGIN_S


async def never_read(port: int, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Sends `request` on a socket with a small receive buffer, then reads nothing more than
    the stream reader's own buffer takes (128 KiB)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(request)
    return reader, writer


async def test_streams_nobody_reads_are_cut_off(world: tuple[Served, str, BackendSimulator]) -> None:
    served, asked_run, sim = world
    port = port_of(served)
    conv = "conv-streamed"
    run_id = await sim.new_run(conv, "alice", "big")
    await sim.start(conv, run_id)
    auth = f"Authorization: Bearer {token('alice')}\r\n"
    resume = f"POST /api/v1/conversations/{conv}/resume/{run_id} HTTP/1.1\r\nHost: s\r\n{auth}\r\n"
    events = f"GET /api/v1/conversations/{conv}/events?run_id={run_id} HTTP/1.1\r\nHost: s\r\n{auth}\r\n"
    content = "x" * 65536
    chunks = 200  # 13 MB a body: more than the socket buffers hold

    async def write() -> None:
        for _ in range(chunks):
            await sim.chunk(conv, run_id, content)
            await asyncio.sleep(0.002)
        await sim.end(conv, run_id)

    async def read_all(http: httpx.AsyncClient) -> int:
        async with open_resume(http, served, conv, run_id) as response:
            return len(await response.aread())

    stalled = [await never_read(port, (resume if i % 2 else events).encode()) for i in range(20)]
    async with http_client() as http, steady_client(served, asked_run) as steady:
        readers = [asyncio.create_task(read_all(http)) for _ in range(2)]
        await write()
        sizes = await asyncio.gather(*readers)
        began = time.monotonic()
        # Every stalled client is cut off, and its stream slot given back.
        await wait_for(lambda: served.sidecar.hub.open == 0, timeout_s=WRITE_STALL_S + 10)
        freed_s = time.monotonic() - began
        # What the kernel's buffers still held, then the end: a body cut short, not finished.
        received = await asyncio.gather(*(bytes_until_closed(r, 30) for r, _ in stalled))
    for _, writer in stalled:
        writer.close()
    print(
        f"20 streams never read: slots freed {freed_s:.1f} s after the run ended, each cut after "
        f"{min(r or 0 for r in received)}-{max(r or 0 for r in received)} bytes; readers got "
        f"{sizes} bytes; {steady.check()}"
    )
    assert all(size > chunks * len(content) for size in sizes)
    assert all(r is not None and r < chunks * len(content) for r in received), received
