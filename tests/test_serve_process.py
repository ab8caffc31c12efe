"""`session-sidecar serve` as a process, with the live index on (issue 9): a taken port
exits at once in one line, and a normal start serves on the socket it bound and stops on
SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from session_sidecar.embedded import free_port
from tests.conftest import TEST_SECRET


def _env(redis_url: str, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    return {
        **clean,
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_JWT_SECRET": TEST_SECRET,
        "SIDECAR_ACCESS_POLICY": "run-owner",
        "SIDECAR_INDEX_MODE": "index",  # the index's task is what raced the bind failure
        "SIDECAR_HOST": "127.0.0.1",
        **extra,
    }


@pytest.mark.parametrize("by_flag", [False, True], ids=["SIDECAR_PORT", "--port"])
def test_a_taken_port_exits_2_at_once_in_one_line(redis_url: str, by_flag: bool) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--port", str(port)] if by_flag else []
        env = _env(redis_url) if by_flag else _env(redis_url, SIDECAR_PORT=str(port))
        # Before the fix this never returned (3 runs of 3): the timeout is the failure.
        result = subprocess.run(
            [sys.executable, "-m", "session_sidecar", "serve", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"session-sidecar: port {port} on 127.0.0.1 is in use: set SIDECAR_PORT or --port"
    ]


def test_serves_on_its_own_socket_and_stops_on_sigterm(redis_url: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "session_sidecar", "serve"],
        env=_env(redis_url, SIDECAR_PORT=str(port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except httpx.TransportError:
                ready = None
            if ready is not None and ready.status_code == 200:
                break
            time.sleep(0.02)
        assert ready is not None and ready.status_code == 200, "never ready (index seeded)"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"Uvicorn running on http://127.0.0.1:{port}" in err
