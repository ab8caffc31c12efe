"""The simulator writes the backend's exact format (SPEC section 1); the demo works as printed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import redis.asyncio as aioredis

from session_sidecar.embedded import free_port
from session_sidecar.simulator import BackendSimulator

CONV = "c1"
ISO_NO_ZONE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?$")


async def _xrange(client: aioredis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries: Any = await client.xrange(key)
    return list(entries)


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
