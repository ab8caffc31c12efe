"""The simulator writes the backend's exact format (SPEC section 1); the demo works as printed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from session_sidecar.embedded import free_port
from session_sidecar.simulator import BackendSimulator, live_run

CONV = "c1"
ISO_NO_ZONE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?$")
FRONTEND_ID = re.compile(r"^conversation:current_user_id:\d{13}(-\d+)?$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


async def _xrange(client: aioredis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries: Any = await client.xrange(key)
    return list(entries)


async def _fields(client: aioredis.Redis, key: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in await _xrange(client, key)]


_KINDS = (
    ("chat:stream:reservation:", "reservation"),
    ("chat:stream:", "stream"),
    ("task:status:", "status"),
    ("task:id:", "task-id"),
    ("cancel:", "cancel"),
)


def _kind(key: str) -> str:
    return next(kind for prefix, kind in _KINDS if key.startswith(prefix))


def _describe(tokens: list[str]) -> str:
    """One write as `NAME kind [args]`: uuids as `*`, stream entries by their type."""
    name, key, *args = tokens
    if name == "XADD":
        return f"XADD {args[args.index('type') + 1]}"
    if name == "DEL":
        return " ".join(["DEL", *(_kind(k) for k in (key, *args))])
    args = ["*" if UUID.match(a) else a for a in args]
    return " ".join([name, _kind(key), *args])


async def _commands(client: aioredis.Redis, work: Awaitable[Any]) -> list[tuple[float, str]]:
    """`(server time, description)` of every command on this test's keys while `work` runs,
    in the order Redis executed them (MONITOR)."""
    mark = f"end-of-{uuid.uuid4()}"
    seen: list[tuple[float, str]] = []
    async with client.monitor() as monitor:
        await work
        await client.echo(mark)
        while True:
            info = await monitor.next_command()
            tokens = info["command"].split(" ")
            if tokens[0] == "ECHO" and tokens[1] == mark:
                return seen
            if len(tokens) > 1 and f":{CONV}:" in tokens[1]:
                seen.append((info["time"], _describe(tokens)))


async def test_entry_fields_and_ttls(redis_client: aioredis.Redis, sim: BackendSimulator) -> None:
    run_id = await sim.full_run(CONV, "u1", "m1", chunks=1)
    stream = sim.stream_key(CONV, run_id)
    entries = [
        (i.decode(), {k.decode(): v.decode() for k, v in f.items()})
        for i, f in await _xrange(redis_client, stream)
    ]
    types = [fields["type"] for _, fields in entries]
    assert types == ["queued", "start", "chunk", "end"]
    for entry_id, fields in entries:
        assert re.fullmatch(r"\d{13}-\d+", entry_id)
        assert fields["conversation_id"] == CONV and fields["run_id"] == run_id
        assert ISO_NO_ZONE.match(fields["created_at"]), fields["created_at"]
    queued, start, chunk, end = (f for _, f in entries)
    assert queued["status"] == "queued" and queued["message"]
    assert start["status"] == "processing" and start["agent_id"]
    assert chunk["citations_json"] == "[]" and chunk["tool_calls_json"] == "[]" and "content" in chunk
    assert end["status"] == "completed" and "usage_json" in end
    assert 890 <= await redis_client.ttl(stream) <= 900
    assert await redis_client.get(sim.status_key(CONV, run_id)) == b"completed"
    assert 590 <= await redis_client.ttl(sim.status_key(CONV, run_id)) <= 600
    assert 590 <= await redis_client.ttl(f"task:id:{CONV}:{run_id}") <= 600


async def test_old_backend_pending_no_queued_and_cancel_leaves_running(
    redis_client: aioredis.Redis, old_sim: BackendSimulator
) -> None:
    run_id = await old_sim.full_run(CONV, "u1", "m1", chunks=1, status="cancelled")
    types = [f[b"type"] for _, f in await _xrange(redis_client, old_sim.stream_key(CONV, run_id))]
    assert types == [b"start", b"chunk", b"end"]
    assert await redis_client.get(old_sim.status_key(CONV, run_id)) == b"running"
    assert await redis_client.get(f"cancel:{CONV}:{run_id}") == b"true"
    assert 290 <= await redis_client.ttl(f"cancel:{CONV}:{run_id}") <= 300
    assert await redis_client.exists(f"task:id:{CONV}:{run_id}") == 0


async def test_run_id_suffixes(sim: BackendSimulator) -> None:
    ids = [await sim.full_run(CONV, "u1", "m1", chunks=0) for _ in range(3)]
    assert ids == ["conversation:u1:m1", "conversation:u1:m1-1", "conversation:u1:m1-2"]
    assert await sim.new_run(CONV, "u1") == "conversation:u1:new"


async def test_stream_is_capped_near_1000(redis_client: aioredis.Redis, sim: BackendSimulator) -> None:
    run_id = await sim.new_run(CONV, "u1", "long")
    pipe_writes = [sim.chunk(CONV, run_id, "x", 1_700_000_000_000 + i) for i in range(1500)]
    for write in pipe_writes:
        await write
    length = await redis_client.xlen(sim.stream_key(CONV, run_id))
    assert 1000 <= length < 1200  # MAXLEN ~ trims whole nodes


async def test_a_run_writes_what_the_backend_writes_in_its_order(
    redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    # Reserve the id, queue (status, `queued` entry, task id), start, stream, end, status.
    commands = await _commands(redis_client, sim.full_run(CONV, "u1", "m1", chunks=1))
    assert [c for _, c in commands] == [
        "SET reservation * NX EX 120",
        "EXISTS stream",
        "SET status queued EX 600",
        "XADD queued",
        "EXPIRE stream 900",
        "SET task-id * EX 600",
        "SET status running EX 600",
        "XADD start",
        "EXPIRE stream 900",
        "XADD chunk",
        "EXPIRE stream 900",
        "XADD end",
        "EXPIRE stream 900",
        "SET status completed EX 600",
    ]
    reservation = f"chat:stream:reservation:{CONV}:conversation:u1:m1"
    assert sim.reservation_key(CONV, "conversation:u1:m1") == reservation
    value: Any = await redis_client.get(reservation)
    assert UUID.match(value.decode())
    assert 110 <= await redis_client.ttl(reservation) <= 120


async def test_a_failed_run_sets_its_status_before_its_end_entry(
    redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    run_id = await sim.full_run(CONV, "u1", "m1", chunks=0, status=None)
    commands = await _commands(redis_client, sim.end(CONV, run_id, "error"))
    assert [c for _, c in commands] == ["SET status error EX 600", "XADD end", "EXPIRE stream 900"]
    end = (await _fields(redis_client, sim.stream_key(CONV, run_id)))[-1]
    assert end["status"] == "error" and end["message"]


async def test_the_frontend_names_runs_with_the_literal_current_user_id(sim: BackendSimulator) -> None:
    ids = [await sim.new_frontend_run(CONV, at_ms=1_700_000_000_123) for _ in range(3)]
    # Reserved but not yet streaming is taken too: the backend appends `-n`.
    assert ids == [
        "conversation:current_user_id:1700000000123",
        "conversation:current_user_id:1700000000123-1",
        "conversation:current_user_id:1700000000123-2",
    ]
    before = int(time.time() * 1000)
    now_id = await sim.new_frontend_run(CONV)
    assert FRONTEND_ID.match(now_id)
    assert abs(int(now_id.rsplit(":", 1)[1]) - before) < 60_000


async def test_regenerate_ids_and_a_stream_that_outlived_its_reservation(
    redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    first = await sim.full_run(CONV, "u1", chunks=0)
    assert first == "conversation:u1:new"
    await redis_client.delete(sim.reservation_key(CONV, first))  # expired; the stream lives on
    second = await sim.new_run(CONV, "u1")
    assert second == "conversation:u1:new-1"
    # The claim of the taken id is given back, as the backend does.
    assert await redis_client.exists(sim.reservation_key(CONV, first)) == 0
    assert await redis_client.exists(sim.reservation_key(CONV, second)) == 1


async def test_old_backends_reserve_nothing_and_reuse_an_id_without_a_stream(
    redis_client: aioredis.Redis, old_sim: BackendSimulator
) -> None:
    assert await old_sim.new_run(CONV, "u1") == await old_sim.new_run(CONV, "u1") == "conversation:u1:new"
    await old_sim.full_run(CONV, "u1", chunks=0)
    assert await old_sim.new_run(CONV, "u1") == "conversation:u1:new-1"
    assert [k async for k in redis_client.scan_iter(match="chat:stream:reservation:*")] == []


async def test_thinking_is_a_plain_field_of_some_chunks(
    redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    run_id = await sim.new_run(CONV, "u1", "m1")
    await sim.chunk(CONV, run_id, "Hello", thinking="The user greets me.")
    await sim.chunk(CONV, run_id, " there")
    thought, plain = await _fields(redis_client, sim.stream_key(CONV, run_id))
    assert thought["thinking"] == "The user greets me." and thought["content"] == "Hello"
    assert "thinking" not in plain


async def test_stop_ends_the_run_then_deletes_it_about_200_ms_later(
    redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    run_id = await sim.full_run(CONV, "u1", "m1", chunks=1, status=None)
    commands = await _commands(redis_client, sim.stop(CONV, run_id))
    assert [c for _, c in commands] == [
        "SET cancel true EX 300",
        "XADD end",
        "EXPIRE stream 900",
        "SET status cancelled EX 600",
        "DEL stream cancel task-id status",
    ]
    (status_at, _), (deleted_at, _) = commands[-2:]
    assert 0.18 <= deleted_at - status_at < 10  # the backend sleeps 0.2 s in between
    for key in (
        sim.stream_key(CONV, run_id),
        sim.status_key(CONV, run_id),
        sim.cancel_key(CONV, run_id),
        sim.task_id_key(CONV, run_id),
    ):
        assert await redis_client.exists(key) == 0, key
    assert await redis_client.exists(sim.reservation_key(CONV, run_id)) == 1  # left to expire


async def test_old_backend_stop_is_a_cancel_that_deletes_nothing(
    redis_client: aioredis.Redis, old_sim: BackendSimulator
) -> None:
    run_id = await old_sim.full_run(CONV, "u1", "m1", chunks=1, status="stopped")
    end = (await _fields(redis_client, old_sim.stream_key(CONV, run_id)))[-1]
    assert end["type"] == "end" and end["status"] == "cancelled"
    assert await redis_client.get(old_sim.status_key(CONV, run_id)) == b"running"


@pytest.mark.parametrize(
    ("naming", "expected"),
    [
        ("frontend", FRONTEND_ID),
        ("regenerate", re.compile(r"^conversation:u1:new$")),
        ("message", re.compile(r"^conversation:u1:[0-9a-f]{12}$")),
    ],
)
async def test_live_runs_are_named_as_their_client_names_them(
    redis_client: aioredis.Redis, sim: BackendSimulator, naming: Any, expected: re.Pattern[str]
) -> None:
    run_id = await live_run(sim, CONV, "u1", chunks=3, chunk_interval_s=0, naming=naming, pickup_s=(0, 0))
    assert expected.match(run_id), run_id
    assert await redis_client.exists(sim.reservation_key(CONV, run_id)) == 1
    chunks = [f for f in await _fields(redis_client, sim.stream_key(CONV, run_id)) if f["type"] == "chunk"]
    assert ["thinking" in f for f in chunks] == [True, True, False]


async def test_a_stopped_live_run_disappears(redis_client: aioredis.Redis, sim: BackendSimulator) -> None:
    run_id = await live_run(
        sim, CONV, "u1", chunks=1, chunk_interval_s=0, outcome="stopped", naming="frontend", pickup_s=(0, 0)
    )
    remaining = [k async for k in redis_client.scan_iter(match=f"*{CONV}*")]
    assert remaining == [sim.reservation_key(CONV, run_id).encode()]


async def test_old_backend_live_runs_never_think(
    redis_client: aioredis.Redis, old_sim: BackendSimulator
) -> None:
    run_id = await live_run(old_sim, CONV, "u1", chunks=3, chunk_interval_s=0, pickup_s=(0, 0))
    fields = await _fields(redis_client, old_sim.stream_key(CONV, run_id))
    assert [f["type"] for f in fields] == ["start", "chunk", "chunk", "chunk", "end"]
    assert not any("thinking" in f for f in fields)


def test_demo_answers_its_printed_curl_lines_and_leaves_nothing_behind() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "session_sidecar", "demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "Ctrl-C" in line or proc.poll() is not None:
                break
        output = "".join(lines)
        curls = re.findall(r"curl (http://\S+)", output)
        assert len(curls) >= 2, output
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)/0", output).group(1))  # type: ignore[union-attr]
        active, task = curls[0], curls[1]
        assert active.endswith("/active-session") and task.endswith("/task-status")
        assert active.startswith(f"http://127.0.0.1:{port}/api/v1/conversations/")
        body = httpx.get(active, timeout=5).json()
        assert body["status"] == "active", body
        # Development mode shows every run, so the web frontend's own run ids answer too.
        assert FRONTEND_ID.match(body["sessionId"]), body
        with redis.Redis(port=redis_port) as embedded:
            reservation = f"chat:stream:reservation:{body['conversationId']}:{body['sessionId']}"
            assert embedded.exists(reservation) == 1
        assert httpx.get(task, timeout=5).json()["isActive"] is True
        for url in curls[2:]:
            assert httpx.get(url, timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    time.sleep(0.3)
    for p in (port, redis_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", p)) != 0, f"port {p} still answers after Ctrl-C"
