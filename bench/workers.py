"""`active-session` served by 1 and by 2 worker processes, side by side on one real Redis.

    python -m bench.workers [--workers 1,2] [--duration 10] [--rounds 3] [--connections 8]

One fill (bench/fill.py, `--size` unrelated keys), then one `session-sidecar serve` per
worker count (`SIDECAR_WORKERS`), each on its own port, loaded in turn by wrk over the
conversation paths, the order rotated every round (bench/run.py's harness and measurement:
quiet Redis before each run, medians over rounds). Reported per worker count: req/s, p50/p99, server
CPU per request (all workers), how many cores the sidecar, Redis and wrk kept busy (on
a small machine they share the cores, which caps what more workers can add), and after
the load, per worker, its RSS and its Redis connections. Written to
`{out}/workers/workers.json` and `{out}/workers/workers.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import shlex
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import redis

from bench.common import mint_token
from bench.fill import fill
from bench.harness import (
    BENCH_DIR,
    Load,
    RedisServer,
    Server,
    check_answers,
    log,
    machine_facts,
    make_server,
    run_wrk,
    wait_redis_quiet,
)
from bench.measure import Measurement, measure, rotated

TARGET_RATIO = 1.6  # req/s of 2 workers over 1 (issue 14)


@dataclass
class WorkersServer(Server):
    """`serve` with its workers: CPU is the whole process tree's, not the idle parent's."""

    def processes(self) -> list[psutil.Process]:
        if self.proc is None:
            return []
        parent = psutil.Process(self.proc.pid)
        workers = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
        return workers or [parent]  # one worker: the parent serves itself

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.processes():
            times = process.cpu_times()
            total += times.user + times.system
        return total

    def per_worker(self, redis_port: int) -> list[dict[str, float]]:
        shown = []
        for process in self.processes():
            connections = [
                c
                for c in process.net_connections("tcp")
                if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
            ]
            shown.append(
                {
                    "pid": process.pid,
                    "rss_mib": process.memory_info().rss / 2**20,
                    "redis_connections": len(connections),
                }
            )
        return shown


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated")
    p.add_argument("--size", type=int, default=10_000, help="unrelated keys beside the runs")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per server per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=float, default=2.0)
    # Enough concurrency to keep two processes busy; the same for every server.
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--wrk-timeout", type=int, default=10)
    p.add_argument("--conversations", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--check-sample", type=int, default=20)
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    counts = [int(n) for n in args.workers.split(",")]
    out: Path = args.out / "workers"
    token = mint_token()
    redis_server = RedisServer()
    redis_url = redis_server.start()
    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench.workers", *(shlex.quote(a) for a in (argv or sys.argv[1:]))]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_facts(redis_url, redis_server.binary),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    servers: list[WorkersServer] = []
    try:
        fill_result = asyncio.run(
            fill(redis_url, args.size, conversations=args.conversations, seed=args.seed)
        )
        fill_json, paths = fill_result.write(out)
        for n in counts:
            base = make_server(
                "sidecar", redis_url, fill_json, out / f"{n}-workers", {"SIDECAR_WORKERS": str(n)}
            )
            servers.append(WorkersServer(**{**base.__dict__, "name": f"{n} worker" + "s" * (n > 1)}))
        for server in servers:
            server.start()
        checks = {}
        for server in servers:
            server.wait_ready()
            checks[server.name] = check_answers(server, fill_result, token, args.check_sample)
            log(f"{server.name} on :{server.port} ready; check {checks[server.name]}")
        load = Load(args.duration, args.connections, args.threads, args.wrk_timeout)
        for server in servers:
            wait_redis_quiet(client)
            run_wrk(server, paths, token, replace(load, duration_s=args.warmup))
        rounds: dict[str, list[Measurement]] = {s.name: [] for s in servers}
        cores: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
        for rnd in range(args.rounds):
            for server in rotated(servers, rnd):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk: the child that ends
                m = measure(server, client, paths, token, rnd, load)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                wrk_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                rounds[server.name].append(m)
                # Where the machine's cores went: what caps the workers' scaling on it.
                cores[server.name].append(
                    {
                        "sidecar": m.server_cpu_s,
                        "redis": m.redis_cpu_s,
                        "wrk": wrk_s,
                        "duration": m.duration_s,
                    }
                )
                shown = f"{m.rps:8.1f} req/s  p50 {m.p50_ms:.2f} ms"
                log(f"round {rnd + 1}/{args.rounds} {server.name:10s} {shown}")
        results["servers"] = {
            s.name: {
                "workers": n,
                "checks": checks[s.name],
                "rps": statistics.median(m.rps for m in rounds[s.name]),
                "rps_min": min(m.rps for m in rounds[s.name]),
                "rps_max": max(m.rps for m in rounds[s.name]),
                "p50_ms": statistics.median(m.p50_ms for m in rounds[s.name]),
                "p99_ms": statistics.median(m.p99_ms for m in rounds[s.name]),
                "errors": sum(sum(m.errors.values()) for m in rounds[s.name]),
                "server_cpu_usec_per_req": statistics.median(
                    m.per_request()["server_cpu_usec_per_req"] for m in rounds[s.name]
                ),
                "per_worker": s.per_worker(redis_port),
                "cores": {
                    k: statistics.median(c[k] / c["duration"] for c in cores[s.name])
                    for k in ("sidecar", "redis", "wrk")
                },
                "rounds": [m.__dict__ for m in rounds[s.name]],
            }
            for n, s in zip(counts, servers, strict=True)
        }
        results["loadavg_at_end"] = os.getloadavg()
    finally:
        for server in servers:
            server.stop()
        client.close()
        redis_server.stop()
    markdown = render(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "workers.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (out / "workers.md").write_text(markdown, encoding="utf-8")
    print("\n" + markdown)
    print(f"wrote {out / 'workers.json'} and {out / 'workers.md'}")
    return 0


def render(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    servers = results["servers"]
    lines = [
        f"Run on {results['date']} with `{results['command']}`: {m['cpu']}, {m['cores']} cores, "
        f"{m['redis']}, {m['wrk']}; load average {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])} "
        f"at start, {', '.join(f'{x:.2f}' for x in results['loadavg_at_end'])} at the end. wrk "
        f"`-t{cfg['threads']} -c{cfg['connections']} -d{cfg['duration']:g}s`, {cfg['rounds']} rounds "
        f"(order rotated), medians; {cfg['size']:,} unrelated keys beside the runs.",
        "",
        "| workers | req/s (min-max) | p50 ms | p99 ms | server CPU µs/req | cores busy: sidecar, Redis, wrk "
        "| errors | per worker: RSS MiB, Redis connections |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in servers.values():
        workers = "; ".join(f"{w['rss_mib']:.0f} MiB, {w['redis_connections']}" for w in s["per_worker"])
        rps = f"{s['rps']:,.0f} ({s['rps_min']:,.0f}-{s['rps_max']:,.0f})"
        busy = ", ".join(f"{s['cores'][k]:.2f}" for k in ("sidecar", "redis", "wrk"))
        lines.append(
            f"| {s['workers']} | {rps} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} "
            f"| {s['server_cpu_usec_per_req']:.0f} | {busy} | {s['errors']} | {workers} |"
        )
    by_count = {s["workers"]: s for s in servers.values()}
    if 1 in by_count and 2 in by_count and by_count[1]["rps"]:
        ratio = by_count[2]["rps"] / by_count[1]["rps"]
        met = "met" if ratio >= TARGET_RATIO else "**not met**"
        lines += ["", f"2 workers / 1 worker, req/s: {ratio:.2f} (target >= {TARGET_RATIO}): {met}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
