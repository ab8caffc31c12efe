"""The web frontend's calls, made by a real browser through the real gateway.

Debian's headless Chromium loads a page from one loopback origin. Its script
calls the sidecar on the gateway's origin (another port) the way the web
frontend does: an `Authorization` header, so the browser sends a CORS preflight
first and reads an answer only if the sidecar's CORS headers allow it. The
sidecar runs on its defaults (the `backend` access policy) plus a backend URL,
and the run is named as the web frontend names runs, which only that policy
shows.

The first page calls active-session, then task-status, and writes what it
received into its DOM; `--dump-dom` prints the DOM once the page is idle
(`--virtual-time-budget` does not advance while a fetch is in flight, so a slow
answer is waited for). The second page follows a run with the resume route
while the test writes it. Virtual time does not wait for a body that is still
streaming, so that test drives Chromium over the DevTools protocol instead, in
real time, and reads the page's progress as it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import json
import re
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

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

# Follows a run as the frontend's ChatService.resumeWithCursor does: active-session for the run
# and its cursor, then a POST to resume, whose body is read as it arrives and cut into the
# concatenated JSON objects by a brace-depth parser of the frontend's kind. `window.progress`
# is what the test reads.
RESUME_PAGE = rb"""<!doctype html>
<html><body><script>
const params = new URLSearchParams(location.search);
const api = `${params.get("gateway")}/api/v1/conversations/${params.get("conversation")}`;
const headers = {Authorization: `Bearer ${params.get("token")}`};

// Accumulates text; tracks the brace depth outside strings; emits each complete top-level object.
class ObjectStream {
  constructor() { this.depth = 0; this.inString = false; this.escaped = false; this.text = ""; }
  push(chunk) {
    const objects = [];
    for (const ch of chunk) {
      if (this.depth > 0) this.text += ch;
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (ch === "\\") this.escaped = true;
        else if (ch === '"') this.inString = false;
      } else if (ch === '"') {
        this.inString = true;
      } else if (ch === "{") {
        if (this.depth++ === 0) this.text = ch;
      } else if (ch === "}" && this.depth > 0 && --this.depth === 0) {
        objects.push(JSON.parse(this.text));
        this.text = "";
      }
    }
    return objects;
  }
}

window.progress = {open: false, objects: [], ended: false};
(async () => {
  const progress = window.progress;
  try {
    const active = await fetch(`${api}/active-session`, {headers, credentials: "include"});
    const session = await active.json();
    const url = new URL(`${api}/resume/${session.sessionId}`);
    url.searchParams.set("cursor", session.cursor || "0-0");
    const response = await fetch(url, {method: "POST", headers});
    progress.status = response.status;
    progress.contentType = response.headers.get("content-type");
    progress.open = true;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const stream = new ObjectStream();
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      progress.objects.push(...stream.push(decoder.decode(value, {stream: true})));
    }
    progress.unfinished = stream.depth > 0 ? stream.text : null;
    progress.ended = true;
  } catch (error) {
    progress.error = String(error);  // how a CORS refusal looks to a page
  }
})();
</script></body></html>
"""
PAGES = {"/": PAGE, "/resume": RESUME_PAGE}
HEADLESS = (
    *("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"),
    *("--no-first-run", "--disable-component-update", "--disable-sync", "--enable-logging=stderr"),
)


def chromium_binary() -> str:
    found = shutil.which("chromium")
    if not found:
        pytest.fail("chromium is not installed: `./dev test` installs it (as root: apt-get install chromium)")
    return found


def serve_page() -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            page = PAGES.get(urlsplit(self.path).path)
            self.send_response(200 if page else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page or b"")))
            self.end_headers()
            if page:
                self.wfile.write(page)

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
            *HEADLESS,
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


class DevTools:
    """A page's DevTools protocol session, as much of it as the test needs: evaluate an expression."""

    def __init__(self, socket: ClientConnection, stderr: list[str]) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._stderr = stderr

    async def evaluate(self, expression: str) -> Any:
        """The expression's value as JSON; None while the page is not there yet, or if it threw."""
        call = next(self._ids)
        params = {"expression": expression, "returnByValue": True}
        await self._socket.send(json.dumps({"id": call, "method": "Runtime.evaluate", "params": params}))
        while True:  # no domain is enabled, so nothing but replies comes back
            reply = json.loads(await self._socket.recv())
            if reply.get("id") == call:
                return reply.get("result", {}).get("result", {}).get("value")

    def console(self) -> str:
        """Chromium's console lines so far (where it says why it refused an answer)."""
        return "\n".join(line for line in self._stderr if ":CONSOLE" in line)


@contextlib.asynccontextmanager
async def devtools_page(url: str, profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium showing `url`, driven in real time over its DevTools protocol."""
    chromium = await asyncio.create_subprocess_exec(
        chromium_binary(),
        *HEADLESS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",  # any free port, written to DevToolsActivePort in the profile
        url,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr: list[str] = []

    async def drain() -> None:  # a full pipe would stall Chromium
        assert chromium.stderr is not None
        async for line in chromium.stderr:
            stderr.append(line.decode(errors="replace"))

    draining = asyncio.create_task(drain())
    try:
        async with asyncio.timeout(30), httpx.AsyncClient() as http:
            while True:
                if chromium.returncode is not None:
                    pytest.fail(f"chromium exited ({chromium.returncode}):\n{''.join(stderr[-50:])}")
                port_file = profile / "DevToolsActivePort"
                port = port_file.read_text().split("\n", 1)[0] if port_file.exists() else ""
                targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json() if port else []
                pages = [t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"]
                if pages:
                    break
                await asyncio.sleep(0.05)
        async with connect(pages[0], max_size=None) as socket:
            yield DevTools(socket, stderr)
    finally:
        if chromium.returncode is None:
            chromium.terminate()
        try:
            await asyncio.wait_for(chromium.wait(), timeout=10)
        except TimeoutError:
            chromium.kill()
            await chromium.wait()
        await draining


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


# Braces, quotes, backslashes and non-ASCII inside strings: a brace-depth parser must skip them.
CHUNKS = [
    ("Let me look", "Considering {the} question..."),
    (' at {"braces"} in strings', None),
    (' and a \\ backslash, "quotes",', None),
    (" caf\u00e9 \u2713 \U0001f389", None),
    (" done}", None),
]


async def wait_for_page(
    page: DevTools, ready: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 15
) -> dict[str, Any]:
    """The page's progress once `ready` holds; fails at once if the page met an error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        progress: dict[str, Any] = await page.evaluate("window.progress") or {}
        if "error" in progress:
            pytest.fail(f"the page failed before {what}: {progress}\n{page.console()}")
        if ready(progress):
            return progress
        if loop.time() > deadline:
            pytest.fail(f"{what} did not reach the page while the run was being written: {progress}")
        await asyncio.sleep(0.02)


def objects_at_least(count: int) -> Callable[[dict[str, Any]], bool]:
    return lambda progress: len(progress.get("objects", [])) >= count


async def test_a_page_on_another_origin_follows_a_run_as_it_is_written(
    sim: BackendSimulator, site: Site, tmp_path: Path
) -> None:
    conversation = conversation_id()
    run_id = await sim.new_frontend_run(conversation)
    await sim.queue(conversation, run_id)

    query = urlencode({"gateway": site.gateway_origin, "conversation": conversation, "token": token("alice")})
    async with devtools_page(f"{site.page_origin}/resume?{query}", tmp_path / "profile") as page:
        try:
            # The run is written while the page reads it, each entry only once the page has parsed
            # the one before: an answer held back anywhere on the way stops the test.
            await wait_for_page(page, lambda p: p.get("open", False), "the resume answer's headers")
            await sim.start(conversation, run_id)
            for i, (message, thinking) in enumerate(CHUNKS, start=1):
                await asyncio.sleep(0.2)  # a model's pace
                await sim.chunk(conversation, run_id, message, thinking=thinking)
                await wait_for_page(page, objects_at_least(1 + i), f"chunk {i}")
        finally:
            await sim.end(conversation, run_id)  # however the writing went: the body ends
        progress = await wait_for_page(page, lambda p: p.get("ended", False), "the end of the body")

    assert progress["status"] == 200, progress
    assert progress["contentType"] == "text/event-stream; charset=utf-8"
    queued: dict[str, Any] = {"message": "", "citations": [], "tool_calls": [], "thinking": None}
    written: list[dict[str, Any]] = [
        {"message": m, "citations": [], "tool_calls": [], "thinking": t} for m, t in CHUNKS
    ]
    # active-session's cursor is the queued entry's id, and resume replays from it inclusively.
    assert progress["objects"] == [queued, *written]
    assert progress["unfinished"] is None
    api = f"/api/v1/conversations/{conversation}"
    seen = [(s.method, s.path) for s in site.sidecar.recorder.seen]
    assert seen == [
        ("OPTIONS", f"{api}/active-session"),
        ("GET", f"{api}/active-session"),
        ("OPTIONS", f"{api}/resume/{run_id}"),
        ("POST", f"{api}/resume/{run_id}"),
    ]
