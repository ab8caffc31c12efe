"""RSS of a sidecar process whose live index holds N runs (default 100,000).

    .venv/bin/python -m bench.index_memory [--runs 100000]

Starts a real Redis, writes N runs through the backend simulator (queued,
start, one chunk; status `running`), starts `session-sidecar serve` in index
mode, waits for `/readyz`, and reads VmRSS from /proc before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import httpx
import redis.asyncio as aioredis

from session_sidecar.embedded import EmbeddedRedis, free_port
from session_sidecar.simulator import BackendSimulator


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def fill(url: str, runs: int, conversations: int) -> None:
    client = aioredis.Redis.from_url(url, max_connections=64)
    sim = BackendSimulator(client)

    async def one(i: int) -> None:
        conv = f"0199{i % conversations:08d}-6de7-7f7a-bf64-96c54db89201"
        run_id = f"conversation:user{i % 5000:05d}:msg{i:08d}"
        await sim.queue(conv, run_id)
        await sim.start(conv, run_id)
        await sim.chunk(conv, run_id, "hello")

    for start in range(0, runs, 50):  # 50 at once: under the pool's 64 connections
        await asyncio.gather(*(one(i) for i in range(start, min(runs, start + 50))))
    await client.aclose()


def wait_ready(port: int, timeout_s: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("sidecar never became ready")


def serve(url: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SIDECAR_REDIS_URL": url, "SIDECAR_JWT_SECRET": "x" * 32,
           "SIDECAR_INDEX_MODE": "index", "SIDECAR_LOG_LEVEL": "warning",
           "SIDECAR_ACCESS_POLICY": "run-owner"}  # fmt: skip
    args = [sys.executable, "-m", "session_sidecar", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(args, env=env)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--conversations", type=int, default=25_000)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        port = free_port()
        empty = serve(server.url, port)
        wait_ready(port)
        empty_rss = rss_mib(empty.pid)
        empty.terminate()
        empty.wait()

        t0 = time.monotonic()
        asyncio.run(fill(server.url, args.runs, args.conversations))
        print(f"wrote {args.runs} runs in {time.monotonic() - t0:.1f} s", flush=True)
        full = serve(server.url, port)
        seed_s = wait_ready(port)
        full_rss = rss_mib(full.pid)
        index_size = next(
            line for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines()
            if line.startswith("sidecar_index_runs ")
        )  # fmt: skip
        full.terminate()
        full.wait()
    per_run = (full_rss - empty_rss) * 1024 * 1024 / args.runs
    print(f"RSS empty index: {empty_rss:.1f} MiB")
    growth = f"+{full_rss - empty_rss:.1f} MiB, {per_run:.0f} B/run"
    print(f"RSS with {args.runs} runs ({args.conversations} conversations): {full_rss:.1f} MiB ({growth})")
    print(f"seeded and ready in {seed_s:.1f} s")
    print(index_size)


if __name__ == "__main__":
    main()
