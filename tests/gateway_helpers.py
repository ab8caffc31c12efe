"""The gateway stack on loopback, for the gateway and browser tests.

* the real sidecar app (`create_app`), served by uvicorn in a thread and
  wrapped in a recorder that notes every request it receives;
* a stub backend (stdlib HTTP server) that answers every GET and POST with 200
  and an echo of what it received as JSON (so it also grants access when the sidecar
  asks `/conversations/{id}/info/`), plus a few endpoints the gateway test
  streams through;
* nginx (Debian package), run as the current user, with a generated top-level
  nginx.conf that defines the two upstream groups the gateway file expects
  and `include`s the repository file itself, unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from session_sidecar.app import create_app
from session_sidecar.embedded import free_port
from session_sidecar.settings import Settings

REPO = Path(__file__).resolve().parent.parent
GATEWAY_CONF = REPO / "deploy" / "nginx" / "sidecar-gateway.conf"
BLOCK = b"x" * (1 << 20)
DOWNLOAD_BLOCKS = 128


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not found:
        pytest.fail("nginx is not installed: `apt-get install nginx` (Debian package; .ci/run installs it)")
    return found


# --- the sidecar, recorded ------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    raw_path: bytes
    headers: dict[str, str]


class Recorder:
    """ASGI wrapper: remembers every HTTP request the sidecar receives."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[Seen] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            self.seen.append(Seen(scope["method"], scope["path"], scope.get("raw_path") or b"", headers))
        await self.app(scope, receive, send)


@dataclass
class Sidecar:
    port: int
    recorder: Recorder
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_sidecar(env: Mapping[str, str]) -> Sidecar:
    """The app configured from `env` alone, as `serve` would be from its environment."""
    settings = Settings.from_env(env)
    recorder = Recorder(create_app(settings))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    config = uvicorn.Config(recorder, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the sidecar did not start")
        time.sleep(0.02)
    return Sidecar(port, recorder, server, thread)


# --- the stub backend ---------------------------------------------------------------------------


@dataclass
class Backend:
    server: ThreadingHTTPServer
    port: int
    seen: list[str] = field(default_factory=list)
    # The streaming endpoint sends its first event, then waits for this before the last one.
    release: threading.Event = field(default_factory=threading.Event)
    sent_last: threading.Event = field(default_factory=threading.Event)
    download_done: threading.Event = field(default_factory=threading.Event)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def start_backend() -> Backend:
    holder: list[Backend] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            backend = holder[0]
            backend.seen.append(self.path)
            if self.path.endswith("/stream/"):
                self._stream(backend)
                return
            if self.path.endswith("/download/"):
                self._download(backend)
                return
            connection = self.headers.get("Connection", "").lower()
            if self.headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection:
                self._upgrade()
                return
            self._echo()

        def do_POST(self) -> None:
            # The backend's own resume route is a POST: a path the gateway leaves to it lands here.
            holder[0].seen.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._echo()

        def _echo(self) -> None:
            body = json.dumps(
                {
                    "who": "backend",
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _stream(self, backend: Backend) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            # A gateway that honoured this would buffer: the reference config must ignore it.
            self.send_header("X-Accel-Buffering", "yes")
            self.end_headers()
            self._chunk(b"data: first\n\n")
            backend.release.wait(timeout=10)
            self._chunk(b"data: last\n\n")
            backend.sent_last.set()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _download(self, backend: Backend) -> None:
            # More than a gateway that buffers would keep in memory and on disk without blinking,
            # far more than the socket buffers between here and a client that does not read.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(DOWNLOAD_BLOCKS * len(BLOCK)))
            self.send_header("X-Accel-Buffering", "yes")
            self.end_headers()
            try:
                for _ in range(DOWNLOAD_BLOCKS):
                    self.wfile.write(BLOCK)
                self.wfile.flush()
                backend.download_done.set()
            except OSError:
                pass  # the client hung up, as the test does

        def _upgrade(self) -> None:
            # Not a WebSocket implementation: the protocol switch, then an echo of one line.
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.write(self.rfile.readline())
            self.wfile.flush()
            self.close_connection = True

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    backend = Backend(server, server.server_address[1])
    holder.append(backend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return backend


# --- nginx --------------------------------------------------------------------------------------


@dataclass
class Nginx:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace")


def top_level_conf(workdir: Path, port: int, sidecar: str, backend: str) -> str:
    """The includer's part: temp paths a non-root nginx can write, the upstreams, the listen port."""
    temp = "\n".join(
        f"    {name}_temp_path {workdir / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx would drop its workers to `nobody`, who cannot read this temp dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
pid {workdir / "nginx.pid"};
error_log stderr warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir / "access.log"};
{temp}
    # Like many production http blocks: compress everything. The gateway file must still stream.
    gzip on;
    gzip_types *;
    gzip_min_length 1;
    upstream session_sidecar {{ server {sidecar}; keepalive 4; }}
    upstream chat_backend {{ server {backend}; keepalive 4; }}
    server {{
        listen 127.0.0.1:{port};
        include {GATEWAY_CONF};
        location / {{ return 404 "gateway: no route\\n"; }}
    }}
}}
"""


def start_nginx(workdir: Path, sidecar: str, backend: str) -> Nginx:
    binary = nginx_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    last_error = ""
    for _ in range(3):  # the free port can be taken between choosing and binding it
        port = free_port()
        conf.write_text(top_level_conf(workdir, port, sidecar, backend))
        check = subprocess.run(
            [binary, "-t", "-p", str(workdir), "-c", str(conf)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            pytest.fail(f"nginx rejects the gateway config:\n{check.stderr}")
        proc = subprocess.Popen(
            [binary, "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return Nginx(port, proc, workdir)
            except OSError:
                time.sleep(0.05)
        last_error = Nginx(port, proc, workdir).stop()
    pytest.fail(f"nginx did not start:\n{last_error}")
