"""p50 of `active-session` as unrelated keys grow, for one lookup mode.

    .venv/bin/python -m bench.keyspace_p50 --mode scan   # SCAN MATCH per request
    .venv/bin/python -m bench.keyspace_p50 --mode auto   # the live index

Starts a real Redis, writes one live run through the backend simulator, starts
`session-sidecar serve`, then for each size adds unrelated keys and drives the
endpoint with `wrk -t1 -c4 -d8s`, printing p50 and requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time

import httpx
import redis
import redis.asyncio as aioredis

from bench.common import JWT_SECRET, mint_token
from session_sidecar.embedded import EmbeddedRedis, free_port
from session_sidecar.simulator import BackendSimulator

CONV = "019953dd-6de7-7f7a-bf64-96c54db89201"
USER = "bench-user"


async def seed(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await BackendSimulator(client).full_run(CONV, USER, "m1", status=None)
    await client.aclose()


def wrk(url: str, token: str) -> tuple[str, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
    out = subprocess.run(
        ["wrk", "-t1", "-c4", "-d8s", "--latency", "-s", script.name, url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    os.unlink(script.name)
    p50 = re.search(r"50%\s+(\S+)", out)
    rps = re.search(r"Requests/sec:\s+(\S+)", out)
    return (p50.group(1) if p50 else "?"), (rps.group(1) if rps else "?")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("auto", "index", "scan"), default="scan")
    parser.add_argument("--sizes", default="1000,100000")
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        asyncio.run(seed(server.url))
        port = free_port()
        env = {**os.environ, "SIDECAR_REDIS_URL": server.url, "SIDECAR_JWT_SECRET": JWT_SECRET,
               "SIDECAR_LOG_LEVEL": "error", "SIDECAR_INDEX_MODE": args.mode,
               "SIDECAR_ACCESS_POLICY": "run-owner"}  # fmt: skip
        cmd = [sys.executable, "-m", "session_sidecar", "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(cmd, env=env)
        try:
            for _ in range(100):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            filler = redis.Redis.from_url(server.url)
            url = f"http://127.0.0.1:{port}/api/v1/conversations/{CONV}/active-session"
            token = mint_token(USER)
            for size in (int(s) for s in args.sizes.split(",")):
                script = "for i=1,tonumber(ARGV[1]) do redis.call('SET','unrelated:'..i,'x') end"
                filler.eval(script, 0, str(size))
                p50, rps = wrk(url, token)
                print(f"mode={args.mode} keys={filler.dbsize():,} p50={p50} req/s={rps}", flush=True)
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
