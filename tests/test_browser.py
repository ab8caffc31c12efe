"""The web frontend's first two calls, made by a real browser through the real gateway.

Debian's headless Chromium loads a page from one loopback origin. Its script
calls active-session, then task-status, on the gateway's origin (another port)
the way the web frontend does: an `Authorization` header and credentials
included, so the browser sends a CORS preflight first and reads an answer only
if the sidecar's CORS headers allow it. The sidecar runs on its defaults (the
`backend` access policy) plus a backend URL, and the run is named as the web
frontend names runs, which only that policy shows.

The page writes what it received into its DOM; `--dump-dom` prints the DOM once
the page is idle (`--virtual-time-budget` does not advance while a fetch is in
flight, so a slow answer is waited for).
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from session_sidecar.simulator import BackendSimulator, conversation_id
from tests.conftest import TEST_SECRET, token
from tests.gateway_helpers import Backend, Sidecar, start_backend, start_nginx, start_sidecar

PAGE = b"""<!doctype html>
<html><body><pre id="result">pending</pre><script>
const params = new URLSearchParams(location.search);
const api = `${params.get("gateway")}/api/v1/conversations/${params.get("conversation")}`;
const init = {headers: {Authorization: `Bearer ${params.get("token")}`}, credentials: "include"};

async function call(endpoint) {
  try {
    const response = await fetch(`${api}/${endpoint}`, init);
    return {status: response.status, body: await response.json()};
  } catch (error) {
    return {error: String(error)};  // how a CORS refusal looks to a page
  }
}

(async () => {
  const activeSession = await call("active-session");
  const taskStatus = await call("task-status");
  document.getElementById("result").textContent = JSON.stringify({activeSession, taskStatus});
})();
</script></body></html>
"""


def chromium_binary() -> str:
    found = shutil.which("chromium")
    if not found:
        pytest.fail("chromium is not installed: `./dev test` installs it (as root: apt-get install chromium)")
    return found


def serve_page() -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path.startswith("/?")
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(PAGE) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(PAGE)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Site:
    page_origin: str
    gateway_origin: str
    backend: Backend
    sidecar: Sidecar


@pytest.fixture
def site(redis_url: str, tmp_path: Path) -> Iterator[Site]:
    chromium_binary()
    with ExitStack() as stack:
        page = serve_page()
        stack.callback(page.server_close)
        stack.callback(page.shutdown)
        page_origin = f"http://127.0.0.1:{page.server_address[1]}"
        backend = start_backend()  # answers 200 to `/conversations/{id}/info/`: access granted
        stack.callback(backend.stop)
        sidecar = start_sidecar(
            {
                "SIDECAR_REDIS_URL": redis_url,
                "SIDECAR_JWT_SECRET": TEST_SECRET,
                "SIDECAR_BACKEND_URL": f"http://127.0.0.1:{backend.port}",
                "SIDECAR_CORS_ALLOWED_ORIGINS": page_origin,
            }
        )
        stack.callback(sidecar.stop)
        nginx = start_nginx(tmp_path / "nginx", f"127.0.0.1:{sidecar.port}", f"127.0.0.1:{backend.port}")
        stack.callback(nginx.stop)
        yield Site(page_origin, f"http://127.0.0.1:{nginx.port}", backend, sidecar)


def open_in_chromium(url: str, profile: Path) -> tuple[dict[str, Any], str]:
    """The page's result, and Chromium's console lines (where it says why it refused an answer)."""
    done = subprocess.run(
        [
            chromium_binary(),
            *("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"),
            *("--no-first-run", "--disable-component-update", "--disable-sync", "--enable-logging=stderr"),
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=45,
    )
    console = "\n".join(line for line in done.stderr.splitlines() if ":CONSOLE" in line)
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert done.returncode == 0 and found, f"chromium failed ({done.returncode}):\n{done.stderr[-3000:]}"
    text = html.unescape(found.group(1))
    assert text != "pending", f"the page did not finish its calls:\n{console}"
    result: dict[str, Any] = json.loads(text)
    return result, console


async def test_a_page_on_another_origin_sees_a_web_frontend_run(
    sim: BackendSimulator, site: Site, tmp_path: Path
) -> None:
    conversation = conversation_id()
    run_id = await sim.new_frontend_run(conversation)
    assert ":current_user_id:" in run_id
    await sim.queue(conversation, run_id)
    await sim.start(conversation, run_id)
    await sim.chunk(conversation, run_id, "Hello", thinking="Considering the question...")

    query = urlencode({"gateway": site.gateway_origin, "conversation": conversation, "token": token("alice")})
    url = f"{site.page_origin}/?{query}"
    result, console = await asyncio.to_thread(open_in_chromium, url, tmp_path / "profile")

    active, task = result["activeSession"], result["taskStatus"]
    assert active.get("status") == 200, f"{result}\n{console}"
    assert active["body"]["status"] == "active"
    assert active["body"]["sessionId"] == run_id
    assert task.get("status") == 200, f"{result}\n{console}"
    assert task["body"]["isActive"] is True
    assert task["body"]["sessionId"] == run_id
    # The browser's own requests, preflights included, all went through the gateway to the sidecar,
    # which asked the backend whether the caller may see the conversation.
    api = f"/api/v1/conversations/{conversation}"
    seen = [(s.method, s.path) for s in site.sidecar.recorder.seen]
    assert seen == [
        ("OPTIONS", f"{api}/active-session"),
        ("GET", f"{api}/active-session"),
        ("OPTIONS", f"{api}/task-status"),
        ("GET", f"{api}/task-status"),
    ]
    assert f"{api}/info/" in site.backend.seen
