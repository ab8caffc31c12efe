"""Fill a Redis with realistic runs plus N unrelated keys.

Runs are written through the project's `BackendSimulator`, so every key, TTL
and stream entry is in the chat backend's exact format. The default shape:

* 200 conversations of one user (the token's `user_id`, so the default
  `run-owner` policy shows them all);
* per conversation 1-3 finished runs spread over the last ~14 minutes (the
  stream TTL is 15 minutes, so that is what a real Redis still holds), and in
  3 conversations out of 4 one run still streaming (status `running`, last
  chunk a few seconds ago); 20-120 chunks per run.

The unrelated keys (`cache:...`, `celery-task-meta-...`, `session:...`, ...,
64-byte string values, no TTL) are what a shared production Redis also holds;
they are written by a server-side Lua loop in slices of 50,000, which loads a
million keys in a few seconds on any Redis-compatible server (no `DEBUG`
command needed).

Also writes, for the load step, the list of request paths and, for the
floor, which run answers for each conversation (`floor`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from bench.common import BENCH_USER, STATUS_PREFIX, STREAM_PREFIX, active_session_path
from session_sidecar.simulator import BackendSimulator

UNRELATED_PREFIXES = (
    "cache:user:",
    "celery-task-meta-",
    "session:",
    "ratelimit:ip:",
    "lock:doc:",
    "cache:search:",
    "_kombu.binding.",
    "feature:flag:",
)
UNRELATED_VALUE = "v" * 64
LUA_SLICE = 50_000

_LUA_FILL = """
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
local value = ARGV[3]
local n = #ARGV - 3
for i = first, last do
  redis.call('SET', ARGV[4 + (i % n)] .. i, value)
end
return last - first + 1
"""


@dataclass
class PlannedRun:
    message_id: str
    start_ms: int
    chunks: int
    step_ms: int
    finished: bool


@dataclass
class FillResult:
    user_id: str
    conversations: int
    runs: int
    active_runs: int
    stream_entries: int
    unrelated_keys: int
    dbsize: int
    runs_seconds: float
    unrelated_seconds: float
    # conversation -> {"stream", "status", "run"}: the run that should answer.
    floor: dict[str, dict[str, str]] = field(default_factory=dict)

    def write(self, directory: Path) -> tuple[Path, Path]:
        """`fill.json` (for the floor and the report) and `paths.txt` (for wrk)."""
        directory.mkdir(parents=True, exist_ok=True)
        data_path = directory / "fill.json"
        data_path.write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")
        paths_path = directory / "paths.txt"
        paths_path.write_text(
            "".join(active_session_path(conv) + "\n" for conv in self.floor), encoding="utf-8"
        )
        return data_path, paths_path


def _conversation_id(rng: random.Random, base_ms: int) -> str:
    """UUIDv7-shaped, as the frontend makes them."""
    ms = base_ms - rng.randrange(30 * 24 * 3600 * 1000)
    rand = f"{rng.getrandbits(76):019x}"
    raw = f"{ms:012x}7{rand[:3]}{'89ab'[rng.randrange(4)]}{rand[3:18]}"
    return str(uuid.UUID(raw))


def plan_conversation(rng: random.Random, now_ms: int) -> list[PlannedRun]:
    """The runs one conversation has in Redis right now, oldest first."""
    runs: list[PlannedRun] = []
    finished = rng.randint(1, 3)
    t = now_ms - 14 * 60 * 1000 + rng.randrange(60_000)
    for _ in range(finished):
        chunks = rng.randint(20, 120)
        step = rng.randint(80, 250)
        runs.append(PlannedRun(uuid.UUID(int=rng.getrandbits(128)).hex[:12], t, chunks, step, True))
        t += (chunks + 3) * step + rng.randint(30_000, 150_000)  # the user reads, then asks again
    if rng.random() < 0.75:
        chunks = rng.randint(20, 120)
        step = rng.randint(80, 250)
        start = now_ms - (chunks + 2) * step - rng.randint(500, 4000)
        runs.append(PlannedRun(uuid.UUID(int=rng.getrandbits(128)).hex[:12], start, chunks, step, False))
    return runs


async def _write_conversation(
    sim: BackendSimulator, conversation: str, user_id: str, plan: list[PlannedRun], rng: random.Random
) -> tuple[str, bool, int]:
    """Writes the runs; returns (the run that answers, whether it is active, entries written)."""
    entries = 0
    answer, answer_active, answer_ms = "", False, -1
    for run in plan:
        run_id = await sim.new_run(conversation, user_id, run.message_id)
        t = run.start_ms
        await sim.queue(conversation, run_id, t)
        t += run.step_ms
        await sim.start(conversation, run_id, t)
        for i in range(run.chunks):
            t += run.step_ms
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 6)))
            await sim.chunk(conversation, run_id, f"{words} " if i else words, t)
        entries += run.chunks + 2
        if run.finished:
            t += run.step_ms
            await sim.end(conversation, run_id, rng.choice(_OUTCOMES), t)
            entries += 1
        # The sidecar's rule: a working run beats any finished one; else the latest activity.
        if not run.finished or (not answer_active and t > answer_ms):
            answer, answer_active, answer_ms = run_id, not run.finished, t
    return answer, answer_active, entries


_WORDS = ("the", "run", "stream", "token", "answer", "model", "redis", "chunk", "user", "data")
_OUTCOMES = ("completed",) * 8 + ("error", "cancelled")


async def fill_runs(
    client: aioredis.Redis | RedisCluster,
    *,
    conversations: int,
    seed: int,
    user_id: str,
    concurrency: int = 16,
) -> FillResult:
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    sim = BackendSimulator(client, stream_prefix=STREAM_PREFIX)  # type: ignore[arg-type]
    convs = [_conversation_id(rng, now_ms) for _ in range(conversations)]
    plans = [plan_conversation(rng, now_ms) for _ in convs]
    seeds = [rng.getrandbits(32) for _ in convs]
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[str, bool, int]:
        async with sem:
            return await _write_conversation(sim, convs[i], user_id, plans[i], random.Random(seeds[i]))

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(len(convs))))
    elapsed = time.perf_counter() - started
    floor = {
        conv: {
            "stream": f"{STREAM_PREFIX}:{conv}:{run_id}",
            "status": f"{STATUS_PREFIX}:{conv}:{run_id}",
            "run": run_id,
        }
        for conv, (run_id, _active, _n) in zip(convs, results, strict=True)
    }
    return FillResult(
        user_id=user_id,
        conversations=len(convs),
        runs=sum(len(p) for p in plans),
        active_runs=sum(1 for _r, active, _n in results if active),
        stream_entries=sum(n for _r, _a, n in results),
        unrelated_keys=0,
        dbsize=0,
        runs_seconds=round(elapsed, 3),
        unrelated_seconds=0.0,
        floor=floor,
    )


async def fill_unrelated(client: aioredis.Redis, n: int, slice_size: int = LUA_SLICE) -> float:
    """N string keys under a few unrelated prefixes, by a server-side loop; returns seconds."""
    started = time.perf_counter()
    script = client.register_script(_LUA_FILL)
    for first in range(0, n, slice_size):
        last = min(n, first + slice_size) - 1
        await script(args=[first, last, UNRELATED_VALUE, *UNRELATED_PREFIXES])
    return time.perf_counter() - started


async def fill_unrelated_cluster(client: RedisCluster, n: int, batch: int = 10_000) -> float:
    """The same keys on a Cluster, where one script cannot write to every slot: grouped by
    the primary that owns them, and pipelined to each one directly."""
    started = time.perf_counter()
    by_node: dict[tuple[str, int], list[str]] = {}
    for i in range(n):
        key = f"{UNRELATED_PREFIXES[i % len(UNRELATED_PREFIXES)]}{i}"
        node = client.get_node_from_key(key)
        assert node is not None, "every slot is served"
        by_node.setdefault((str(node.host), int(node.port)), []).append(key)
    for (host, port), keys in by_node.items():
        async with aioredis.Redis(host=host, port=port, socket_timeout=60) as direct:
            for first in range(0, len(keys), batch):
                pipe = direct.pipeline(transaction=False)
                for key in keys[first : first + batch]:
                    pipe.set(key, UNRELATED_VALUE)
                await pipe.execute()
    return time.perf_counter() - started


async def fill(
    redis_url: str,
    unrelated: int,
    *,
    conversations: int = 200,
    seed: int = 1,
    user_id: str = BENCH_USER,
    flush: bool = True,
    cluster: bool = False,
) -> FillResult:
    """FLUSHALL (by default), the runs, then the unrelated keys; `cluster`: `redis_url` is
    a Cluster node's."""
    client: aioredis.Redis | RedisCluster
    if cluster:
        client = RedisCluster.from_url(redis_url, socket_timeout=60)
    else:
        client = aioredis.Redis.from_url(redis_url, socket_timeout=60)
    try:
        if flush:
            await client.flushall()
        result = await fill_runs(client, conversations=conversations, seed=seed, user_id=user_id)
        if isinstance(client, RedisCluster):
            await client.initialize()
            seconds = await fill_unrelated_cluster(client, unrelated)
        else:
            seconds = await fill_unrelated(client, unrelated)
        result.unrelated_seconds = round(seconds, 3)
        result.unrelated_keys = unrelated
        every = {"target_nodes": RedisCluster.PRIMARIES} if cluster else {}
        result.dbsize = int(await client.dbsize(**every))
        return result
    finally:
        await client.aclose()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="fill a Redis for the benchmark")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--unrelated", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/out/fill"))
    args = parser.parse_args()
    result = asyncio.run(
        fill(args.redis_url, args.unrelated, conversations=args.conversations, seed=args.seed)
    )
    result.write(args.out)
    summary = {k: v for k, v in asdict(result).items() if k != "floor"}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
