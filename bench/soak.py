"""Soak: a fixed request rate for minutes against the real service, while runs come and go.

    python -m bench.soak [--duration 300] [--rate 500] [--conversations 200] [--tokens 10000]
    ./dev soak [same options]

Starts an embedded Redis, the simulated backend (a steady churn of live runs that
complete, fail, are cancelled, stopped and deleted, or crash) and `session-sidecar
serve` as a subprocess on 127.0.0.1 (run-owner policy, HS256). Then sends `--rate`
requests per second, open loop, spread over both endpoints and every conversation,
each with one of `--tokens` distinct valid tokens of the conversation's owner (more
than `--token-cache-size`, so the verified-token cache works at its bound), and
`--invalid` of them with a token signed by the wrong key.

Reports answers by status, p50/p99 latency, the service's RSS every `--sample-every`
seconds, its open file descriptors and Redis connections at start and end. Exits 1
when an assertion fails:

* no answer other than 200 or 404, except a 401 for each invalid token (and only for them);
* no 200 showing another conversation's or another user's run;
* at least 90 % of the rate was sent (else the machine, not the service, was measured);
* RSS flattens: its last sample is at most max(16 MiB, 10 %) above the one at half-time;
* no descriptor leaked: the growth of open descriptors is that of Redis connections
  (+8), and those stay within the pool (64) and a few dedicated ones (+8).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import aiohttp
import jwt
import psutil
import redis.asyncio as aioredis

from session_sidecar.embedded import EmbeddedRedis, free_port
from session_sidecar.simulator import BackendSimulator, Outcome, live_run
from session_sidecar.store.client import MAX_CONNECTIONS

SECRET = "soak-only-secret-0123456789abcdef0123456789abcdef0123456789abcdef"
WRONG_SECRET = "not-the-service-secret-0123456789abcdef0123456789abcdef01234567"
API = "/api/v1/conversations"
OUTCOMES: dict[Outcome, int] = {"completed": 50, "stopped": 20, "cancelled": 10, "error": 10, "crashed": 10}
OWN_CLIENT = "soak"  # CLIENT SETNAME of this program's Redis connections, to tell them apart


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    invalid_sent: int = 0
    invalid_401: int = 0
    transport_errors: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    late: int = 0  # sent more than 100 ms after its slot: the generator fell behind


@dataclass
class World:
    conversations: list[str]
    owner: dict[str, str]
    tokens: dict[str, list[str]]  # user -> distinct valid tokens
    invalid: list[str]
    invalid_share: float


def make_world(conversations: int, users: int, tokens: int, invalid_share: float) -> World:
    names = [f"soak-{i:04d}" for i in range(conversations)]
    user_ids = [f"user{i:03d}" for i in range(users)]
    exp = int(time.time()) + 24 * 3600
    by_user: dict[str, list[str]] = {u: [] for u in user_ids}
    for i in range(tokens):
        user = user_ids[i % users]
        claims = {"user_id": user, "sub": user, "exp": exp, "jti": uuid.uuid4().hex}
        by_user[user].append(jwt.encode(claims, SECRET, algorithm="HS256"))
    invalid = [
        jwt.encode({"user_id": "mallory", "sub": "mallory", "exp": exp, "jti": str(i)}, WRONG_SECRET)
        for i in range(100)
    ]
    owner = {c: user_ids[i % users] for i, c in enumerate(names)}
    return World(names, owner, by_user, invalid, invalid_share)


async def churn(sim: BackendSimulator, world: World, live_runs: int, stop: asyncio.Event) -> Counter[str]:
    """Keeps `live_runs` runs going at once, each ending one way or another, until `stop`."""
    ended: Counter[str] = Counter()
    outcomes, weights = list(OUTCOMES), list(OUTCOMES.values())

    async def one() -> None:
        conversation = random.choice(world.conversations)
        outcome = random.choices(outcomes, weights)[0]
        await live_run(
            sim,
            conversation,
            world.owner[conversation],
            # ~5 s runs: with the default 24 at a time over 1,000 conversations, about one
            # run per conversation every 3 minutes, all of them kept 15 minutes (the key TTLs).
            chunks=random.randint(5, 40),
            outcome=outcome,
            pickup_s=(0.05, 0.3),
        )
        ended[outcome] += 1

    running: set[asyncio.Task[None]] = set()
    while not stop.is_set():
        while len(running) < live_runs:
            running.add(asyncio.create_task(one()))
        done, running = await asyncio.wait(running, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    return ended


@contextlib.asynccontextmanager
async def sidecar(redis_url: str, port: int, token_cache_size: int, stderr: BinaryIO) -> AsyncIterator[int]:
    """`session-sidecar serve` as a subprocess; yields its pid once /readyz answers 200."""
    env = {
        **os.environ,
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_JWT_SECRET": SECRET,
        "SIDECAR_ACCESS_POLICY": "run-owner",
        "SIDECAR_HOST": "127.0.0.1",
        "SIDECAR_PORT": str(port),
        "SIDECAR_TOKEN_CACHE_SIZE": str(token_cache_size),
        "SIDECAR_LOG_LEVEL": "warning",  # no access line per request
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "session_sidecar", "serve", env=env, stderr=stderr
    )
    try:
        async with aiohttp.ClientSession() as probe:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with probe.get(f"http://127.0.0.1:{port}/readyz") as ready:
                        if ready.status == 200:
                            break
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the service did not get ready; its log: {stderr.name}")
                await asyncio.sleep(0.1)
        yield proc.pid
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def redis_connections(client: aioredis.Redis) -> int:
    """The service's connections to Redis: every client but this program's own."""
    return sum(1 for c in await client.client_list() if c.get("name") != OWN_CLIENT)


async def ask(http: aiohttp.ClientSession, world: World, tally: Tally) -> None:
    conversation = random.choice(world.conversations)
    endpoint = random.choice(("active-session", "task-status"))
    invalid = random.random() < world.invalid_share
    owner = world.owner[conversation]
    token = random.choice(world.invalid if invalid else world.tokens[owner])
    tally.invalid_sent += invalid
    started = time.monotonic()
    try:
        async with http.get(
            f"{API}/{conversation}/{endpoint}", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            status = response.status
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.transport_errors[type(exc).__name__] += 1
        return
    tally.latencies.append(time.monotonic() - started)
    tally.statuses[status] += 1
    if invalid:
        tally.invalid_401 += status == 401
    elif status == 200 and (
        body["conversationId"] != conversation or not body["sessionId"].startswith(f"conversation:{owner}:")
    ):
        tally.wrong.append(f"{conversation} as {owner}: {body}")


async def load(base_url: str, world: World, rate: float, duration: float, concurrency: int) -> Tally:
    """Open loop: `rate` requests per second in 10 ms slots, at most `concurrency` in flight.

    aiohttp, not httpx: httpx's connection pool slows down as connections are added (about
    70 requests/s at 64 in flight on this project's machines), aiohttp's does not.
    """
    tally = Tally()
    gate = asyncio.Semaphore(concurrency)
    in_flight: set[asyncio.Task[None]] = set()

    async def one() -> None:
        try:
            await ask(http, world, tally)
        finally:
            gate.release()

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(base_url, connector=connector, timeout=timeout) as http:
        start = time.monotonic()
        while (now := time.monotonic()) < start + duration:
            for _ in range(int((now - start) * rate) - tally.sent):
                await gate.acquire()
                if time.monotonic() - (start + (tally.sent + 1) / rate) > 0.1:
                    tally.late += 1
                tally.sent += 1
                task = asyncio.create_task(one())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.sleep(0.01)
        await asyncio.gather(*in_flight)
    return tally


async def sample_rss(pid: int, every: float, stop: asyncio.Event, samples: list[tuple[float, float]]) -> None:
    process = psutil.Process(pid)
    start = time.monotonic()
    while True:
        rss = process.memory_info().rss / 2**20
        samples.append((time.monotonic() - start, rss))
        log(f"RSS {rss:.1f} MiB at {samples[-1][0]:.0f} s")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
            return


def percentile(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else float("nan")


@dataclass
class Observed:
    tally: Tally
    ended: Counter[str]  # runs the simulator ended meanwhile, by outcome
    rss: list[tuple[float, float]]  # (seconds, MiB)
    fds: tuple[int, int]  # (start, end)
    redis_connections: tuple[int, int]
    cpu_s: float  # the service's CPU time during the load
    load_average: tuple[float, float]  # the machine's 1-minute load average, start and end
    error_lines: int


async def soak(args: argparse.Namespace, service_log: BinaryIO) -> Observed:
    world = make_world(args.conversations, args.users, args.tokens, args.invalid)
    with EmbeddedRedis() as server:
        client = aioredis.Redis.from_url(server.url, client_name=OWN_CLIENT)
        sim = BackendSimulator(client)
        past = int(time.time() * 1000) - 60_000
        for conversation in world.conversations:  # every conversation answers 200 from the start
            await sim.full_run(conversation, world.owner[conversation], "seed", chunks=1, start_ms=past)
        port = free_port()
        async with sidecar(server.url, port, args.token_cache_size, service_log) as pid:
            service = psutil.Process(pid)
            fds_start, conns_start = service.num_fds(), await redis_connections(client)
            cpu_start, load_start = sum(service.cpu_times()[:2]), os.getloadavg()[0]
            stop = asyncio.Event()
            rss: list[tuple[float, float]] = []
            churning = asyncio.create_task(churn(sim, world, args.live_runs, stop))
            sampling = asyncio.create_task(sample_rss(pid, args.sample_every, stop, rss))
            log(
                f"{args.rate:.0f}/s for {args.duration:.0f} s, {len(world.conversations)} conversations, "
                f"{args.tokens} tokens, {args.invalid:.0%} invalid, {args.live_runs} live runs at a time"
            )
            tally = await load(f"http://127.0.0.1:{port}", world, args.rate, args.duration, args.concurrency)
            stop.set()
            ended = await churning
            await sampling
            await asyncio.sleep(0.5)  # the service closes the load's keep-alive sockets
            fds_end, conns_end = service.num_fds(), await redis_connections(client)
            cpu_s, load_end = sum(service.cpu_times()[:2]) - cpu_start, os.getloadavg()[0]
        await client.aclose()
    fds, conns = (fds_start, fds_end), (conns_start, conns_end)
    return Observed(tally, ended, rss, fds, conns, cpu_s, (load_start, load_end), 0)


def report(observed: Observed, args: argparse.Namespace) -> list[str]:
    """Logs the figures; returns the failed assertions (none: passed)."""
    tally, rss = observed.tally, observed.rss
    (fds_start, fds_end), (conns_start, conns_end) = observed.fds, observed.redis_connections
    p50, p99 = percentile(tally.latencies, 50), percentile(tally.latencies, 99)
    half = next(r for t, r in rss if t >= rss[-1][0] / 2)
    statuses = dict(sorted(tally.statuses.items()))
    log(f"sent {tally.sent} ({tally.sent / args.duration:.0f}/s, {tally.late} late); answers {statuses}")
    log(f"invalid tokens {tally.invalid_sent}, answered 401: {tally.invalid_401}")
    log(f"latency p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(tally.latencies) * 1000:.0f} ms")
    log(f"runs ended meanwhile: {dict(observed.ended)}")
    answered = sum(tally.statuses.values())
    log(f"service CPU {observed.cpu_s:.1f} s ({observed.cpu_s / max(answered, 1) * 1e6:.0f} µs per answer); "
        f"machine load average {observed.load_average[0]:.1f} -> {observed.load_average[1]:.1f}")  # fmt: skip
    log(f"RSS MiB: {', '.join(f'{r:.1f}' for _, r in rss)} (half-time {half:.1f}, end {rss[-1][1]:.1f})")
    log(f"open fds {fds_start} -> {fds_end}; Redis connections {conns_start} -> {conns_end}; "
        f"error lines in the service's log: {observed.error_lines}")  # fmt: skip

    failures = []
    errors = {s: n for s, n in tally.statuses.items() if s not in (200, 404, 401)}
    valid_401 = tally.statuses[401] - tally.invalid_401
    if errors or valid_401 or tally.transport_errors or tally.invalid_401 != tally.invalid_sent:
        failures.append(
            f"errors: {errors}, 401 for valid tokens {valid_401}, transport {dict(tally.transport_errors)}, "
            f"invalid tokens answered 401 {tally.invalid_401}/{tally.invalid_sent}"
        )
    if tally.wrong:
        failures.append(f"{len(tally.wrong)} wrong answers, e.g. {tally.wrong[:3]}")
    if tally.sent < 0.9 * args.rate * args.duration:
        failures.append(f"sent {tally.sent}, under 90 % of {args.rate}/s: the generator could not keep up")
    if rss[-1][1] - half > max(16.0, 0.1 * half):
        failures.append(f"RSS still growing: {half:.1f} MiB at half-time, {rss[-1][1]:.1f} MiB at the end")
    # The pool, plus a few dedicated connections (the index's subscriber, the stream hub's readers).
    if fds_end - fds_start > conns_end - conns_start + 8 or conns_end > MAX_CONNECTIONS + 8:
        failures.append(f"fds {fds_start} -> {fds_end}, Redis connections {conns_start} -> {conns_end}")
    if observed.error_lines:
        failures.append(f"{observed.error_lines} error lines in the service's log")
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    parser.add_argument("--rate", type=float, default=500, help="requests per second (default 500)")
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--users", type=int, default=20, help="conversation owners")
    parser.add_argument("--tokens", type=int, default=10_000, help="distinct valid tokens")
    parser.add_argument("--token-cache-size", type=int, default=5_000, help="SIDECAR_TOKEN_CACHE_SIZE")
    parser.add_argument("--invalid", type=float, default=0.01, help="share of invalid tokens")
    parser.add_argument("--live-runs", type=int, default=24, help="runs streaming at any time")
    parser.add_argument("--concurrency", type=int, default=64, help="most requests in flight")
    parser.add_argument("--sample-every", type=float, default=15, help="seconds between RSS samples")
    parser.add_argument("--service-log", help="keep the service's log (warnings and errors) in this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sidecar-soak-") as tmp:
        log_path = Path(args.service_log or Path(tmp) / "sidecar.log")
        with log_path.open("wb") as service_log:
            observed = asyncio.run(soak(args, service_log))
        lines = log_path.read_text(errors="replace").splitlines()
    observed.error_lines = sum(1 for line in lines if '"level":"error"' in line)
    failures = report(observed, args)
    for failure in failures:
        log(f"FAIL: {failure}")
    log("FAILED" if failures else "PASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
