"""bench/run.py's measurement: the interleaved load runs and the figures taken from them.

Per keyspace size: FLUSHALL and fill, the servers started and checked, warm-up,
then `--rounds` rounds in which every server gets one load run at every
concurrency (`--connections`), both orders rotated each round. Around every
run Redis is let go quiet and `INFO commandstats` / `INFO cpu` deltas are
taken; the medians over rounds are what the report shows and the targets judge.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import redis

from bench.cluster_redis import PRIMARIES, ClusterRedis
from bench.common import mint_token
from bench.fill import fill
from bench.harness import (
    SERVER_ORDER,
    InfoSource,
    Load,
    RedisServer,
    RedisSnapshot,
    Server,
    check_answers,
    log,
    machine_facts,
    make_server,
    run_wrk,
    sidecar_available,
    sidecar_index_metrics,
    wait_redis_quiet,
)

T = TypeVar("T")
# The sidecar's req/s over the floor's, by wrk -c: issue 10's targets at 4 and 64
# connections, the first issue's 0.6 at any other.
FLOOR_GOALS = {4: 0.9, 64: 0.85}
FLOOR_GOAL = 0.6


@dataclass
class Measurement:
    server: str
    round: int
    connections: int
    requests: int
    ok_requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    redis_calls: int
    redis_usec: int
    redis_cpu_s: float
    server_cpu_s: float
    commands: dict[str, list[int]] = field(default_factory=dict)
    quiesce_s: float = 0.0

    def per_request(self) -> dict[str, float]:
        n = max(self.requests, 1)
        return {
            "redis_cmds_per_req": self.redis_calls / n,
            "redis_usec_per_req": self.redis_usec / n,
            "redis_cpu_usec_per_req": self.redis_cpu_s * 1e6 / n,
            "server_cpu_usec_per_req": self.server_cpu_s * 1e6 / n,
        }


def measure(server: Server, client: InfoSource, paths: Path, token: str, rnd: int, load: Load) -> Measurement:
    quiesce = wait_redis_quiet(client)
    before = RedisSnapshot.take(client)
    cpu0 = server.cpu_seconds()
    wrk = run_wrk(server, paths, token, load)
    # Taken as soon as wrk stops: the requests still in flight then are not in
    # wrk's count, and the first requests' work is; the two roughly cancel.
    after = RedisSnapshot.take(client)
    cpu1 = server.cpu_seconds()
    commands, redis_cpu = after.delta(before)
    duration_s = wrk["duration_us"] / 1e6
    errors = {k: int(v) for k, v in wrk["errors"].items()}
    ok = max(0, int(wrk["requests"]) - errors["status"])
    lat = wrk["latency_us"]
    return Measurement(
        server=server.name,
        round=rnd,
        connections=load.connections,
        requests=int(wrk["requests"]),
        ok_requests=ok,
        duration_s=duration_s,
        rps=ok / duration_s if duration_s > 0 else 0.0,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        max_ms=lat["max"] / 1000,
        errors=errors,
        redis_calls=sum(c for c, _ in commands.values()),
        redis_usec=sum(u for _, u in commands.values()),
        redis_cpu_s=redis_cpu,
        server_cpu_s=cpu1 - cpu0,
        commands={k: [c, u] for k, (c, u) in sorted(commands.items())},
        quiesce_s=round(quiesce, 2),
    )


def summarize(rounds: list[Measurement]) -> dict[str, Any]:
    def med(get: Callable[[Measurement], float]) -> float:
        return float(statistics.median(get(m) for m in rounds))

    per = [m.per_request() for m in rounds]
    return {
        "rps": med(lambda m: m.rps),
        "p50_ms": med(lambda m: m.p50_ms),
        "p90_ms": med(lambda m: m.p90_ms),
        "p99_ms": med(lambda m: m.p99_ms),
        "p50_ms_min": min(m.p50_ms for m in rounds),
        "p50_ms_max": max(m.p50_ms for m in rounds),
        "rps_min": min(m.rps for m in rounds),
        "rps_max": max(m.rps for m in rounds),
        "requests": sum(m.requests for m in rounds),
        "non_2xx": sum(m.errors["status"] for m in rounds),
        "socket_errors": sum(m.errors[k] for m in rounds for k in ("connect", "read", "write", "timeout")),
        **{k: float(statistics.median(p[k] for p in per)) for k in per[0]},
    }


def rotated(items: Sequence[T], by: int) -> list[T]:
    k = by % len(items)
    return [*items[k:], *items[:k]]


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Every size in turn on one Redis (a single server, or a Cluster with `--cluster`)."""
    names = [n for n in SERVER_ORDER if n in {s.strip() for s in args.servers.split(",")}]
    if "sidecar" in names and not sidecar_available():
        log("session_sidecar.app is not there yet: running without (b)")
        names.remove("sidecar")
    extra_env = dict(kv.split("=", 1) for kv in args.sidecar_env)
    sidecar_env_shown = {k: v for k, v in os.environ.items() if k == "SIDECAR_INDEX_MODE"} | extra_env
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    token = mint_token()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "config": {
            "sizes": sizes,
            "duration": args.duration,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "wrk_timeout": args.wrk_timeout,
            "conversations": args.conversations,
            "servers": names,
            "sidecar_env": ", ".join(f"{k}={v}" for k, v in sidecar_env_shown.items()),
        },
        "sizes": {},
    }
    started = time.monotonic()
    redis_server: RedisServer | ClusterRedis = ClusterRedis() if args.cluster else RedisServer()
    redis_url = redis_server.start()
    client: InfoSource
    if isinstance(redis_server, ClusterRedis):
        client = redis_server.info_client()
        # The baseline and the floor read `BENCH_REDIS_CLUSTER` (the environment they inherit).
        os.environ["BENCH_REDIS_CLUSTER"] = "1"
        extra_env["SIDECAR_REDIS_CLUSTER"] = "true"
    else:
        client = redis.Redis.from_url(redis_url, socket_timeout=60)
    results["machine"] = machine_facts(redis_url, redis_server.binary)
    if args.cluster:
        results["machine"]["redis"] += f", a {PRIMARIES}-primary Cluster"
    log(f"Redis at {redis_url} ({results['machine']['redis']}); servers: {', '.join(names)}")
    try:
        for size in sizes:
            results["sizes"][str(size)] = run_size(size, names, redis_url, client, token, extra_env, args)
            # Written after every size, so an interrupted run still leaves data.
            (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    finally:
        client.close()
        redis_server.stop()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    log(f"done in {results['elapsed_s']:.0f} s")
    return results


def run_size(
    size: int, names: list[str], redis_url: str, client: InfoSource, token: str,
    extra_env: dict[str, str], args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    size_dir: Path = args.out / f"size-{size}"
    log(f"size {size:,}: FLUSHALL and fill")
    fill_result = asyncio.run(
        fill(redis_url, size, conversations=args.conversations, seed=args.seed, cluster=args.cluster)
    )
    fill_json, paths = fill_result.write(size_dir)
    log(
        f"  {fill_result.runs} runs, {fill_result.stream_entries:,} entries "
        f"in {fill_result.runs_seconds:.1f} s; "
        f"{size:,} unrelated keys in {fill_result.unrelated_seconds:.1f} s; DBSIZE {fill_result.dbsize:,}"
    )
    servers = [make_server(n, redis_url, fill_json, size_dir, extra_env) for n in names]
    loads = [Load(args.duration, c, args.threads, args.wrk_timeout) for c in args.connections]
    data: dict[str, Any] = {
        "fill": {k: v for k, v in fill_result.__dict__.items() if k != "floor"},
        "checks": {},
    }
    rounds: dict[int, dict[str, list[Measurement]]] = {
        load.connections: {s.name: [] for s in servers} for load in loads
    }
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
            data["checks"][server.name] = check_answers(server, fill_result, token, args.check_sample)
            log(f"  {server.name} on :{server.port} ready; check {data['checks'][server.name]}")
        if args.warmup > 0:
            # At every concurrency: each server's Redis pool grows to what the measured runs use.
            for load in loads:
                for server in servers:
                    wait_redis_quiet(client)
                    run_wrk(server, paths, token, replace(load, duration_s=args.warmup))
        for rnd in range(args.rounds):
            # Both orders turn every round: no server always runs right after the slow
            # baseline, no concurrency always right after the other.
            for load in rotated(loads, rnd):
                for server in rotated(servers, rnd):
                    m = measure(server, client, paths, token, rnd, load)
                    rounds[load.connections][server.name].append(m)
                    per = m.per_request()
                    log(
                        f"  round {rnd + 1}/{args.rounds} -c{load.connections:<3d} {server.name:8s} "
                        f"{m.rps:9.1f} req/s  p50 {m.p50_ms:8.2f} ms  p99 {m.p99_ms:8.2f} ms  "
                        f"redis {per['redis_usec_per_req']:8.1f} µs/req  "
                        f"{per['redis_cmds_per_req']:.1f} cmds/req"
                        + (f"  errors {m.errors}" if any(m.errors.values()) else "")
                    )
        wait_redis_quiet(client)
        for server in servers:
            if server.name == "sidecar":
                data["sidecar_metrics"] = sidecar_index_metrics(server)
    finally:
        for server in servers:
            server.stop()
    data["connections"] = {
        str(connections): {
            name: {"median": summarize(ms), "rounds": [m.__dict__ for m in ms]}
            for name, ms in by_name.items()
        }
        for connections, by_name in rounds.items()
    }
    return data


def compute_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    sizes = results["sizes"]
    counts: list[int] = results["config"]["connections"]
    # Latency and Redis cost are judged where queueing adds least: the fewest connections.
    low = min(counts)

    def get(size: int, server: str, key: str, connections: int = low) -> float | None:
        entry = sizes.get(str(size), {}).get("connections", {}).get(str(connections), {}).get(server)
        return None if entry is None else float(entry["median"][key])

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    keys = sorted(int(s) for s in sizes)
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, higher_is_better: bool) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        op = ">=" if higher_is_better else "<="
        out.append({"target": name, "value": value, "goal": f"{op} {target:g}", "met": met})

    if len(keys) >= 2:
        lo, hi = keys[0], keys[-1]
        add(
            f"sidecar p50 at {hi:,} / p50 at {lo:,}, -c{low}",
            ratio(get(hi, "sidecar", "p50_ms"), get(lo, "sidecar", "p50_ms")), 1.2, False,
        )  # fmt: skip
    for size, goal in ((10_000, 5.0), (1_000_000, 200.0)):
        if size in keys:
            add(
                f"sidecar req/s / baseline req/s at {size:,}, -c{low}",
                ratio(get(size, "sidecar", "rps"), get(size, "baseline", "rps")), goal, True,
            )  # fmt: skip
    for size in keys:
        for c in counts:
            add(
                f"sidecar req/s / floor req/s at {size:,}, -c{c}",
                ratio(get(size, "sidecar", "rps", c), get(size, "floor", "rps", c)),
                FLOOR_GOALS.get(c, FLOOR_GOAL), True,
            )  # fmt: skip
    for size in keys:
        add(
            f"sidecar Redis µs/req / floor's at {size:,}, -c{low}",
            ratio(get(size, "sidecar", "redis_usec_per_req"), get(size, "floor", "redis_usec_per_req")),
            2.0, False,
        )  # fmt: skip
    for size in keys:
        add(
            f"(same, from Redis process CPU instead) at {size:,}, -c{low}",
            ratio(
                get(size, "sidecar", "redis_cpu_usec_per_req"), get(size, "floor", "redis_cpu_usec_per_req")
            ),
            2.0, False,
        )  # fmt: skip
    return out
