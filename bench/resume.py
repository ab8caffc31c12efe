"""Following live runs: the sidecar's resume route against the backend's, side by side.

    python -m bench.resume [--clients 100,1000,5000] [--sidecar-workers 1,2] [--duration 20] [--record]
    python -m bench.resume --from-json bench/out/resume.json [--record]   # no load: re-render

For each number of clients N there are M = N/10 live runs, written by
`bench/resume_writer.py` (a process of its own, through `BackendSimulator`): a chunk
every 100-200 ms per run, each carrying the wall clock of its XADD. Each server in turn,
on a freshly flushed Redis and as a fresh process:

(a) backend: `bench/resume_app.py`, the backend's own route rendered faithfully
    (FastAPI, a synchronous generator in Starlette's thread pool of 40, one Redis
    connection per client, `XREAD BLOCK 5000 COUNT 1`);
(b) sidecar: `python -m session_sidecar serve`, started as `bench/run.py` starts it
    (the run-owner policy; every other setting at its default), once per worker count
    of `--sidecar-workers` (`SIDECAR_WORKERS`: 1, one process, is always among them, so
    that the figure of one process stands next to that of several, never in its place).

The N clients live in this process (uvloop, raw sockets, responses parsed by httptools,
chunk contents found by one regular expression: a few microseconds per read). Each
POSTs `resume/{run}?cursor=0-0` for run i mod M, the connections opened evenly over
`--ramp-rate` per second (over 5 s at least), then reads the replay and follows the run
live to its end.

Measured over `--duration` s after the ramp and `--warmup` s: the server's Redis
connections (CLIENT LIST, the bench's own named connections left out; the highest
sample), the delay from each chunk's XADD to its arrival at a client (every chunk
written in the window, however late it arrives), the server's RSS growth per client
and CPU per delivered chunk (its whole process tree: the workers and their supervisor,
if any). After the runs end, every client is served (the
whole run, in order, and the body ended), refused (no connection, or not a 200), or
stalled (anything else once `--grace` s have passed). This process's own CPU and
event-loop lag are reported too: they show whether the clients kept up. Only 127.0.0.1
is used; every phase is bounded, so the run stops by itself.

The machine is shared: before each scenario the bench waits (up to `--quiet-wait` s)
until other processes use less than `--quiet` % of its CPU, and it reports how much
CPU they used during the window, since that inflates every delay measured.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import resource
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httptools
import psutil
import redis

from bench.common import API_PREFIX, JWT_SECRET, STREAM_PREFIX, mint_token
from bench.harness import ROOT, RedisServer, Server, free_port, log, make_server
from bench.resume_report import SERVERS, commit, plot, record, render
from bench.resume_writer import conversation_of, run_id_of

CHUNK = re.compile(rb'"message": "m(\d+):(\d+) "')  # in a resume body (json.dumps of the content)
CONTENT = re.compile(rb"^m(\d+):(\d+) $")  # in the stream entry itself
OPENING = 200  # connections being opened at once at most: the listen backlog is finite
MIN_RAMP_S = 5.0


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class Window:
    start_us: float = float("inf")
    end_us: float = float("inf")
    deliveries: int = 0  # chunks received during the window
    delays_us: array.array[int] = field(default_factory=lambda: array.array("q"))  # of window chunks
    following: int = 0  # clients whose body has neither ended nor failed
    all_finished: asyncio.Event = field(default_factory=asyncio.Event)


class Follower(asyncio.Protocol):
    """One client: the POST, then the body as it comes, chunk numbers checked for order."""

    def __init__(self, run: int, window: Window) -> None:
        self.run, self.window = run, window
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.received = 0  # the next chunk number expected
        self.in_window = 0
        self.ended = False
        self.refused = False  # no connection, no answer, or not a 200
        self.error: str | None = None
        self.tail = b""
        window.following += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(f"bad HTTP: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended or self.error:
            return  # the body ended, or this side gave up
        self.refused = not self.status
        self.fail("closed before the end of the body" if self.status else "closed before any answer")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.status != 200:
            self.refused = True
            self.fail(f"answered {self.status}")

    def on_body(self, body: bytes) -> None:
        arrived = now_us()
        data = self.tail + body if self.tail else body
        cut = data.rfind(b"}") + 1
        self.tail = data[cut:]
        window = self.window
        for seq, written in CHUNK.findall(data, 0, cut):
            if int(seq) != self.received:
                self.fail(f"chunk {int(seq)} where {self.received} was due")
            self.received = int(seq) + 1
            written_us = int(written)
            if window.start_us <= written_us < window.end_us:
                window.delays_us.append(arrived - written_us)
                self.in_window += 1
            if window.start_us <= arrived < window.end_us:
                window.deliveries += 1

    def on_message_complete(self) -> None:
        self.ended = True
        self.finish()

    def fail(self, error: str) -> None:
        if not self.ended and self.error is None:
            self.error = error
            self.finish()

    def finish(self) -> None:
        self.window.following -= 1
        if self.window.following == 0:
            self.window.all_finished.set()
        if self.transport is not None:
            self.transport.close()


async def open_follower(
    port: int, run: int, window: Window, token: str, opening: asyncio.Semaphore
) -> Follower:
    path = f"{API_PREFIX}/conversations/{conversation_of(run)}/resume/{run_id_of(run)}?cursor=0-0"
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    follower = Follower(run, window)
    async with opening:
        try:
            await asyncio.get_running_loop().create_connection(lambda: follower, "127.0.0.1", port)
        except OSError as exc:
            follower.refused = True
            follower.fail(f"connect: {exc.strerror or exc}")
            return follower
    assert follower.transport is not None
    follower.transport.write(request)
    return follower


# --------------------------------------------------------------------------- measurements


def processes(pid: int) -> list[psutil.Process]:
    """A server's processes: itself, and under `--workers` its workers."""
    parent = psutil.Process(pid)
    return [parent, *parent.children(recursive=True)]


def rss_kb(pid: int) -> int:
    total = 0
    for process in processes(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total // 1024


def cpu_s(pid: int) -> float:
    total = 0.0
    for process in processes(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def redis_cpu_s(client: redis.Redis) -> float:
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def wait_until_quiet(threshold_percent: float, max_wait_s: float) -> float:
    """Waits until the machine is nearly idle (others run tests too); its busy % at the end."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_s()
        await asyncio.sleep(3)
        busy = (machine_busy_s() - before) / 3 / (os.cpu_count() or 1) * 100
        if busy < threshold_percent or time.monotonic() > deadline:
            return busy
        log(f"the machine is {busy:.0f} % busy; waiting for it to quieten")
        await asyncio.sleep(10)


def server_connections(client: redis.Redis) -> dict[str, int]:
    """The server's Redis connections by client name (the bench names its own `bench-*`)."""
    by_name: dict[str, int] = {}
    for entry in cast(list[dict[str, Any]], client.client_list()):
        name = entry.get("name", "")
        if not name.startswith("bench-"):
            by_name[name or "(unnamed)"] = by_name.get(name or "(unnamed)", 0) + 1
    return by_name


async def loop_lag(lags_ms: list[float], stop: asyncio.Event) -> None:
    """How late this process's event loop wakes up: if the clients fall behind, it shows here."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + 0.01
        await asyncio.sleep(0.01)
        lags_ms.append((loop.time() - due) * 1000)


def chunks_written(client: redis.Redis, runs: int, window: Window) -> tuple[list[int], list[int]]:
    """Per run: every chunk written, and those written in the window (read back from the streams)."""
    totals, in_window = [], []
    for first in range(0, runs, 50):
        pipe = client.pipeline(transaction=False)
        for run in range(first, min(first + 50, runs)):
            pipe.xrange(f"{STREAM_PREFIX}:{conversation_of(run)}:{run_id_of(run)}")
        for entries in pipe.execute():
            written = [CONTENT.match(f.get(b"content", b"")) for _, f in entries if f[b"type"] == b"chunk"]
            times = [int(m[2]) for m in written if m]
            totals.append(len(times))
            in_window.append(sum(window.start_us <= t < window.end_us for t in times))
    return totals, in_window


def quantile_ms(values: array.array[int], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 1)


# --------------------------------------------------------------------------- one scenario


def workers_started(pid: int, workers: int, redis_port: int) -> bool:
    """Every worker has started its app: each holds a connection to Redis (its index's)."""
    started = 0
    for process in processes(pid)[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            if "spawn_main" in " ".join(process.cmdline()) and any(
                c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
                for c in process.net_connections("tcp")
            ):
                started += 1
    return started >= workers


def start_server(name: str, workers: int, redis_url: str, out: Path) -> Server:
    if name == "sidecar":
        env = {"SIDECAR_WORKERS": str(workers)}
        server = make_server("sidecar", redis_url, out / "unused.json", out / f"{workers}-workers", env)
    else:
        env = {**os.environ, "BENCH_REDIS_URL": redis_url, "BENCH_JWT_SECRET": JWT_SECRET}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        port = free_port()
        argv = [
            sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--no-access-log", "--log-level", "warning", "bench.resume_app:app",
        ]  # fmt: skip
        server = Server(name, argv, env, port, "/healthz", out / "logs" / f"{name}-resume.log")
    server.start()
    server.wait_ready()
    assert server.proc is not None
    deadline = time.monotonic() + 60  # every worker, not just the first to answer
    redis_port = int(urllib.parse.urlsplit(redis_url).port or 6379)
    while workers > 1 and not workers_started(server.proc.pid, workers, redis_port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: fewer than {workers} workers started; see {server.log_path}")
        time.sleep(0.2)
    return server


async def scenario(
    name: str, workers: int, clients: int, args: argparse.Namespace, redis_url: str
) -> dict[str, Any]:
    runs = max(1, clients // 10)
    ramp = max(MIN_RAMP_S, clients / args.ramp_rate)
    busy_before = await wait_until_quiet(args.quiet, args.quiet_wait)
    control = redis.Redis.from_url(redis_url, client_name="bench-driver")
    control.flushall()
    server = await asyncio.to_thread(start_server, name, workers, redis_url, Path(args.out))
    assert server.proc is not None
    pid, token, window = server.proc.pid, mint_token(), Window()
    followers: list[Follower] = []
    lags_ms: list[float] = []
    stop_lag = asyncio.Event()
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.resume_writer", "--redis-url", redis_url,
        "--runs", str(runs), "--seed", str(clients), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert writer.stdout is not None
        async with asyncio.timeout(120):
            if (await writer.stdout.readline()).strip() != b"ready":
                raise RuntimeError("the writer did not start its runs")
        # Warm the server's code paths (and the sidecar's hub) before its idle RSS is taken;
        # a few probes at once, so that each worker is likely to get one.
        probes = [
            await open_follower(server.port, 0, Window(), token, asyncio.Semaphore(1))
            for _ in range(2 * workers)
        ]
        await asyncio.sleep(0.5)
        for probe in probes:
            probe.fail("probe done")
        await asyncio.sleep(0.5)
        idle_rss_kb = rss_kb(pid)
        opening = asyncio.Semaphore(OPENING)
        started = time.monotonic()

        async def start(i: int) -> None:
            await asyncio.sleep(i * ramp / clients)
            followers.append(await open_follower(server.port, i % runs, window, token, opening))

        await asyncio.gather(*(start(i) for i in range(clients)))
        log(f"{name}, {clients} clients: connected in {time.monotonic() - started:.1f} s, warming up")
        await asyncio.sleep(max(0.0, ramp + args.warmup - (time.monotonic() - started)))

        lagging = asyncio.create_task(loop_lag(lags_ms, stop_lag))
        ours0 = cpu_s(writer.pid) + redis_cpu_s(control) + own_cpu_s()
        cpu0, own0, busy0, window.start_us = cpu_s(pid), own_cpu_s(), machine_busy_s(), now_us()
        samples: list[dict[str, int]] = []
        peak_rss_kb = 0
        while now_us() < window.start_us + args.duration * 1e6:
            samples.append(await asyncio.to_thread(server_connections, control))
            peak_rss_kb = max(peak_rss_kb, rss_kb(pid))
            await asyncio.sleep(min(2.0, max(0.0, (window.start_us + args.duration * 1e6 - now_us()) / 1e6)))
        cpu1, own1, busy1, window.end_us = cpu_s(pid), own_cpu_s(), machine_busy_s(), now_us()
        ours1 = cpu_s(writer.pid) + redis_cpu_s(control) + own_cpu_s()
        stop_lag.set()
        await lagging
        log(f"{name}, {clients} clients: measured; ending the runs")
        await asyncio.sleep(1)  # the last chunks of the window are written well before any `end`
        writer.terminate()  # every run gets its `end`
        async with asyncio.timeout(60):
            await writer.wait()
        if window.following:
            window.all_finished.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(window.all_finished.wait(), args.grace)
        for follower in followers:
            follower.fail(f"still following {args.grace:.0f} s after its run ended")
        totals, in_window = await asyncio.to_thread(chunks_written, control, runs, window)
    finally:
        if writer.returncode is None:
            writer.kill()
        await writer.wait()
        for follower in followers:
            if follower.transport is not None:
                follower.transport.close()
        await asyncio.to_thread(server.stop)
        control.close()

    served = sum(f.ended and not f.error and f.received == totals[f.run] for f in followers)
    refused = sum(f.refused for f in followers)
    expected = sum(in_window[f.run] for f in followers if f.status == 200)
    peak = max(samples, key=lambda s: sum(s.values()))
    seconds_measured = (window.end_us - window.start_us) / 1e6
    return {
        "server": name,
        "workers": workers,
        "clients": clients,
        "runs": runs,
        "redis_connections": sum(peak.values()),
        "redis_connections_by_name": peak,
        "delay_p50_ms": quantile_ms(window.delays_us, 0.50),
        "delay_p99_ms": quantile_ms(window.delays_us, 0.99),
        "delay_max_ms": quantile_ms(window.delays_us, 1.0),
        "window_chunks_delivered": len(window.delays_us),
        "window_chunks_undelivered": expected - len(window.delays_us),
        "served": served,
        "refused": refused,
        "stalled": clients - served - refused,
        "errors": _error_counts(followers, totals),
        "idle_rss_mb": round(idle_rss_kb / 1024, 1),
        "peak_rss_mb": round(peak_rss_kb / 1024, 1),
        "rss_kb_per_client": round((peak_rss_kb - idle_rss_kb) / clients, 1),
        "deliveries_per_s": round(window.deliveries / seconds_measured),
        "cpu_percent": round((cpu1 - cpu0) / seconds_measured * 100, 1),
        "cpu_us_per_delivery": round((cpu1 - cpu0) * 1e6 / max(window.deliveries, 1), 1),
        "clients_cpu_percent": round((own1 - own0) / seconds_measured * 100, 1),
        # Everything but the server, the clients, the writer and Redis: others' tests and benches.
        "others_cpu_percent": max(
            0, round(((busy1 - busy0) - (cpu1 - cpu0) - (ours1 - ours0)) / seconds_measured * 100)
        ),
        "busy_before_percent": round(busy_before),
        "clients_loop_lag_p99_ms": quantile_ms(array.array("q", (int(lag * 1000) for lag in lags_ms)), 0.99),
    }


def _error_counts(followers: list[Follower], totals: list[int]) -> dict[str, int]:
    """What the clients that were not served saw, counted by kind."""
    counts: dict[str, int] = {}
    for f in followers:
        kind = f.error or (None if f.received == totals[f.run] else "the body ended before the run did")
        if kind:
            kind = re.sub(r"\d+", "N", kind) if kind.startswith("chunk ") else kind  # out of order
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def servers(args: argparse.Namespace) -> list[tuple[str, int]]:
    """Each server to run, with its number of worker processes."""
    found: list[tuple[str, int]] = []
    for name in args.servers:
        found += [(name, n) for n in args.sidecar_workers] if name == "sidecar" else [(name, 1)]
    return found


def worker_counts(text: str) -> list[int]:
    counts = [int(x) for x in text.split(",")]
    if 1 not in counts or min(counts) < 1:
        # Several workers use several cores: shown beside one process, never instead of it.
        raise argparse.ArgumentTypeError("worker counts >= 1, and 1 among them")
    return counts


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    redis_server = RedisServer()
    redis_url = redis_server.start()
    results: list[dict[str, Any]] = []
    try:
        for clients in args.clients:
            for name, workers in servers(args):
                ramp = max(MIN_RAMP_S, clients / args.ramp_rate)
                budget = args.quiet_wait + ramp + args.warmup + args.duration + args.grace + 300
                async with asyncio.timeout(budget):  # the run stops by itself, whatever happens
                    result = await scenario(name, workers, clients, args, redis_url)
                log(json.dumps(result))
                results.append(result)
    finally:
        redis_server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000, 5000])
    parser.add_argument("--servers", type=lambda s: s.split(","), default=list(SERVERS))
    parser.add_argument(
        "--sidecar-workers", type=worker_counts, default=[1, 2], help="SIDECAR_WORKERS to run, e.g. 1,2"
    )
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per scenario")
    parser.add_argument("--ramp-rate", type=float, default=250.0, help="clients connecting per second")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after the ramp, unmeasured")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds for clients to finish")
    parser.add_argument("--quiet", type=float, default=25.0, help="%% of the machine's CPU others may use")
    parser.add_argument("--quiet-wait", type=float, default=300.0, help="longest wait for that, seconds")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--plot", default=str(ROOT / "bench" / "resume.png"), help="'' for none")
    parser.add_argument("--record", action="store_true", help="rewrite the resume block of bench/RESULTS.md")
    parser.add_argument("--from-json", help="no load: render, plot (and --record) a resume.json")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
    else:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        # Thousands of sockets here, and in the servers and Redis started from here.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        report = {
            "command": " ".join(["python -m bench.resume", *(argv if argv is not None else sys.argv[1:])]),
            "commit": commit(),
            "results": asyncio.run(main_async(args)),
            "date": f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        }
        (Path(args.out) / "resume.json").write_text(json.dumps(report, indent=2))
    block = render(report)
    print(block)
    if args.plot:
        plot(report["results"], Path(args.plot))
    if args.record:
        record(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
