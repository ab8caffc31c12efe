"""`serve --workers 2` as a process: two workers answer on the one socket the parent bound,
each holds watch requests of its own, and SIGTERM drains both (held requests answered at
once, not when their wait ends) and exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil

from session_sidecar.embedded import free_port
from tests.conftest import TEST_SECRET, auth

HOLD_S = 30  # a held request's wait: far longer than the drain may take


def _env(redis_url: str, port: int) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return {
        **clean,
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_JWT_SECRET": TEST_SECRET,
        "SIDECAR_ACCESS_POLICY": "run-owner",
        "SIDECAR_INDEX_MODE": "index",
        "SIDECAR_HOST": "127.0.0.1",
        "SIDECAR_PORT": str(port),
        # Longer than the test waits: only answering held requests first ends the drain in time.
        "SIDECAR_SHUTDOWN_TIMEOUT_S": str(HOLD_S),
    }


def _workers(parent: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(parent).children() if "spawn_main" in " ".join(p.cmdline())]


def _holding(worker: psutil.Process, port: int) -> int:
    return sum(
        1
        for c in worker.net_connections("tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
    )


async def test_two_workers_answer_and_drain_on_sigterm(redis_url: str) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(  # noqa: ASYNC220 - the process outlives any one await
        [sys.executable, "-m", "session_sidecar", "serve", "--workers", "2"],
        env=_env(redis_url, port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    held: list[asyncio.Task[httpx.Response]] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=HOLD_S + 10) as http:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            workers = _workers(proc.pid)
            assert len(workers) == 2, workers
            path = "/api/v1/conversations/conv-workers/task-status"
            first = await http.get(path, headers=auth("alice"))
            assert first.status_code == 404
            params = {"wait": str(HOLD_S), "since": first.headers["etag"]}
            # Held requests until each worker holds some: the kernel hands out connections.
            while not all(_holding(w, port) for w in workers) and len(held) < 64:
                held += [
                    asyncio.create_task(http.get(path, headers=auth("alice"), params=params))
                    for _ in range(4)
                ]
                await asyncio.sleep(0.3)
            assert all(_holding(w, port) for w in workers), "each worker holds requests"
            assert not any(task.done() for task in held), "held, nothing changed"
            stopped = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            answers = await asyncio.wait_for(asyncio.gather(*held), timeout=10)
            answered_s = time.monotonic() - stopped
        assert {a.status_code for a in answers} == {404}
        assert all(a.headers["etag"] == first.headers["etag"] for a in answers)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        exited_s = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert answered_s < 5 and exited_s < 15, (answered_s, exited_s)
    assert f"Uvicorn running on http://127.0.0.1:{port} (2 workers)" in err
    assert err.count("Finished server process") == 2, err[-2000:]
