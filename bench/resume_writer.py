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

The chunks due in one turn of this process's event loop go to Redis in one pipeline
(`Batched`): the commands are the ones `BackendSimulator.chunk` makes, recorded as it
makes them. A pipeline per chunk cost this process 180 µs of CPU per chunk (redis-py's
pool checkout, packing and parsing): at 5,000 clients, 3,300 chunks a second, 60 % of
one of this machine's two cores, taken from the server being measured. A chunk's clock
is read before it waits for its turn's pipeline, so that wait counts in its delay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis

from bench.common import BENCH_USER
from session_sidecar.simulator import BackendSimulator

CHUNK_EVERY_S = (0.1, 0.2)
CONNECTIONS = 32  # enough that no chunk waits for a connection


Call = tuple[str, tuple[Any, ...], dict[str, Any]]


class Batched:
    """What `BackendSimulator` takes for its client, for `chunk` (which only makes a
    pipeline): every pipeline executed in one turn of the event loop is sent as one."""

    def __init__(self, client: aioredis.Redis):
        self._client = client
        self._queued: list[tuple[list[Call], asyncio.Future[list[Any]]]] = []
        self._flushes: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references

    def pipeline(self, transaction: bool = False) -> _Recorded:
        return _Recorded(self)

    async def run(self, calls: list[Call]) -> list[Any]:
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queued.append((calls, done))
        if len(self._queued) == 1:
            flush = asyncio.create_task(self._flush())  # starts once this turn is over
            self._flushes.add(flush)
            flush.add_done_callback(self._flushes.discard)
        return await done

    async def _flush(self) -> None:
        queued, self._queued = self._queued, []
        pipe = self._client.pipeline(transaction=False)
        for calls, _ in queued:
            for name, args, kwargs in calls:
                getattr(pipe, name)(*args, **kwargs)
        try:
            replies = await pipe.execute()
        except Exception as exc:
            for _, done in queued:
                done.set_exception(exc)
            return
        for calls, done in queued:
            done.set_result(replies[: len(calls)])
            replies = replies[len(calls) :]


class _Recorded:
    """A pipeline as `BackendSimulator` uses it: its calls are kept, to be made on the real one."""

    def __init__(self, batch: Batched):
        self._batch = batch
        self._calls: list[Call] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self._calls.append((name, args, kwargs))

        return record

    async def execute(self) -> list[Any]:
        return await self._batch.run(self._calls)


def conversation_of(index: int) -> str:
    return f"bench-resume-{index:05d}"


def run_id_of(index: int) -> str:
    """What `BackendSimulator.new_run` names the run on an empty Redis: the backend's own form."""
    return f"conversation:{BENCH_USER}:m{index}"


def chunk_content(seq: int) -> str:
    return f"m{seq}:{time.time_ns() // 1000} "


async def write_run(
    sim: BackendSimulator, chunks: BackendSimulator, index: int, stop: asyncio.Event, rng: random.Random
) -> None:
    conversation, run_id = conversation_of(index), run_id_of(index)
    seq = 0
    while True:
        await asyncio.sleep(rng.uniform(*CHUNK_EVERY_S))
        if stop.is_set():
            break
        await chunks.chunk(conversation, run_id, chunk_content(seq))
        seq += 1
    await sim.end(conversation, run_id)


async def main_async(args: argparse.Namespace) -> None:
    pool = aioredis.BlockingConnectionPool.from_url(
        args.redis_url, max_connections=CONNECTIONS, client_name="bench-writer"
    )
    client = aioredis.Redis(connection_pool=pool)
    sim = BackendSimulator(client)
    chunks = BackendSimulator(cast(aioredis.Redis, Batched(client)))  # `chunk` only makes pipelines
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
            *(write_run(sim, chunks, i, stop, random.Random(rng.random())) for i in range(args.runs))
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
