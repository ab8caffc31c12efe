"""What a key event costs the index's subscriber in RESP3 and in RESP2, side by side.

    python -m bench.pubsub [--events 15000] [--rate 3000] [--rounds 3]

The live index hears one `xadd` key event per entry written (at 5,000 followers on 500
runs, about 3,300 a second). This reads them as `LiveIndex._read` does
(`PubSub.get_message(timeout=1.0)`, uvloop) while a writer process appends entries at
`--rate` a second, and reports this process's CPU per event for each protocol: rounds
interleaved, medians, and the ratio. Why store/client.py's FOLLOWING_PROTOCOL is 2.
Only 127.0.0.1 is used; each round stops after its events.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import redis.asyncio as aioredis
import uvloop

from bench.harness import RedisServer

WRITER = """
import sys, time, redis
r = redis.Redis.from_url(sys.argv[1])
events, rate = int(sys.argv[2]), float(sys.argv[3])
start = time.perf_counter()
for i in range(events):
    r.xadd("chat:stream:c%d:r" % (i % 500), {"type": "chunk", "content": "x"})
    ahead = start + (i + 1) / rate - time.perf_counter()
    if ahead > 0:
        time.sleep(ahead)
"""


async def cpu_per_event(url: str, protocol: int, events: int, rate: float) -> float:
    client = aioredis.Redis.from_url(url, protocol=protocol)
    pubsub = client.pubsub()
    await pubsub.subscribe("__keyevent@0__:xadd")
    while (message := await pubsub.get_message(timeout=1.0)) is None or message["type"] != "subscribe":
        pass
    writer = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, url, str(events), str(rate))
    heard = 0
    started = time.process_time()
    try:
        while heard < events:
            if await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0) is not None:
                heard += 1
        return (time.process_time() - started) / events * 1e6
    finally:
        await asyncio.wait_for(writer.wait(), 60)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=15_000)
    parser.add_argument("--rate", type=float, default=3_000.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = RedisServer()
    url = server.start()
    try:
        figures: dict[int, list[float]] = {3: [], 2: []}
        for _ in range(args.rounds):
            for protocol in figures:
                figures[protocol].append(uvloop.run(cpu_per_event(url, protocol, args.events, args.rate)))
    finally:
        server.stop()
    medians = {protocol: statistics.median(values) for protocol, values in figures.items()}
    for protocol, values in figures.items():
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(f"RESP{protocol}: {medians[protocol]:.1f} µs of CPU per key event (rounds: {rounds})")
    print(f"RESP2 / RESP3: {medians[2] / medians[3]:.2f}")


if __name__ == "__main__":
    main()
