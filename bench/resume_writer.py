"""The backend's side of bench/resume.py, in a process of its own: M live runs.

    python -m bench.resume_writer --redis-url URL --runs M [--max-seconds S] [--seed N]

Every run is written through `BackendSimulator` (the backend's exact keys, fields and
order): queued and started at once, then a chunk every 100-200 ms until SIGTERM (or
`--max-seconds`, so that it stops by itself), then `end`. Once every run has started,
one line `ready` goes to stdout; the process exits when every run has ended.

Each chunk's content is `m{seq}:{µs} `: its number in the run (from 0) and the wall
clock in microseconds just before its XADD is sent, which is what the clients measure
the delivery delay from. The process is separate from the clients so that neither's
event loop delays the other's clock readings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import time

import redis.asyncio as aioredis

from bench.common import BENCH_USER
from session_sidecar.simulator import BackendSimulator

CHUNK_EVERY_S = (0.1, 0.2)
CONNECTIONS = 32  # enough that no chunk waits for a connection


def conversation_of(index: int) -> str:
    return f"bench-resume-{index:05d}"


def run_id_of(index: int) -> str:
    """What `BackendSimulator.new_run` names the run on an empty Redis: the backend's own form."""
    return f"conversation:{BENCH_USER}:m{index}"


def chunk_content(seq: int) -> str:
    return f"m{seq}:{time.time_ns() // 1000} "


async def write_run(sim: BackendSimulator, index: int, stop: asyncio.Event, rng: random.Random) -> None:
    conversation, run_id = conversation_of(index), run_id_of(index)
    seq = 0
    while True:
        await asyncio.sleep(rng.uniform(*CHUNK_EVERY_S))
        if stop.is_set():
            break
        await sim.chunk(conversation, run_id, chunk_content(seq))
        seq += 1
    await sim.end(conversation, run_id)


async def main_async(args: argparse.Namespace) -> None:
    pool = aioredis.BlockingConnectionPool.from_url(
        args.redis_url, max_connections=CONNECTIONS, client_name="bench-writer"
    )
    client = aioredis.Redis(connection_pool=pool)
    sim = BackendSimulator(client)
    rng = random.Random(args.seed)
    try:
        for index in range(args.runs):
            conversation = conversation_of(index)
            run_id = await sim.new_run(conversation, BENCH_USER, f"m{index}")
            if run_id != run_id_of(index):
                raise SystemExit(f"run {index} is named {run_id!r}: Redis was not empty")
            await sim.queue(conversation, run_id)
            await sim.start(conversation, run_id)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.call_later(args.max_seconds, stop.set)
        print("ready", flush=True)
        await asyncio.gather(
            *(write_run(sim, i, stop, random.Random(rng.random())) for i in range(args.runs))
        )
    finally:
        await client.aclose()
        await pool.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.resume_writer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
