"""Metrics, JSON logs, request ids, the generated OpenAPI document and the docs page."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import gzip
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from openapi_spec_validator import validate
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message

from session_sidecar import __version__
from session_sidecar.embedded import free_port
from session_sidecar.errors import ApiError, BadRequest, Forbidden, NotFound, Unauthorized, Unavailable
from session_sidecar.models import openapi_schema
from session_sidecar.observability import JsonFormatter, Metrics
from session_sidecar.settings import DEFAULT_CONVERSATION_ID_PATTERN, Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import Api, auth, open_api, token

CONV = "conv-obs"
RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(Z|[+-]\d\d:\d\d)")


# --- request ids -----------------------------------------------------------------------------------


async def test_request_id_is_echoed_or_generated(api: Api) -> None:
    sent = await api.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert sent.headers["x-request-id"] == "abc-123"
    fresh = await api.client.get("/healthz")
    assert len(fresh.headers["x-request-id"]) == 32
    # A hostile id (header injection, huge) is replaced, not echoed.
    odd = await api.client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert odd.headers["x-request-id"] != "x" * 500


# --- metrics -----------------------------------------------------------------------------------------


def families(text: str) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_metrics_count_requests_refusals_and_latency(api: Api, sim: BackendSimulator) -> None:
    await sim.full_run(CONV, "alice", "m", status=None)
    await api.get(CONV, "active-session")
    await api.get(CONV, "task-status", user=None)
    await api.get("missing", "task-status")
    await api.client.request("BREW", f"/api/v1/conversations/{CONV}/task-status")
    text = (await api.client.get("/metrics")).text
    assert 'sidecar_requests_total{route="active-session",status="200"} 1.0' in text
    assert 'sidecar_requests_total{route="task-status",status="401"} 1.0' in text
    assert 'sidecar_requests_total{route="task-status",status="404"} 1.0' in text
    assert 'sidecar_auth_failures_total{reason="missing"} 1.0' in text
    # Latency by route, method and status; a method nobody serves is `other`, not a new label value.
    counts = {
        (sample.labels["route"], sample.labels["method"], sample.labels["status"]): sample.value
        for sample in families(text)["sidecar_request_duration_seconds"].samples
        if sample.name == "sidecar_request_duration_seconds_count"
    }
    assert counts[("active-session", "GET", "200")] == 1
    assert counts[("task-status", "GET", "401")] == 1
    assert counts[("task-status", "other", "405")] == 1
    assert "BREW" not in text
    assert "conversations/" not in text  # label values never carry ids


async def test_the_route_label_is_the_route_that_matched(api: Api) -> None:
    prefix = f"{api.settings.api_prefix}/conversations/{CONV}"
    # A path no route serves is `other`, whatever it ends with.
    assert (await api.client.get("/elsewhere/active-session", headers=auth("alice"))).status_code == 404
    # The streams' own routes; a preflight, answered before routing, by the route it asks for.
    assert (await api.client.get(f"{prefix}/events")).status_code == 401
    assert (await api.client.post(f"{prefix}/resume/conversation:alice:m")).status_code == 401
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"}
    assert (await api.client.options(f"{prefix}/task-status", headers=preflight)).status_code == 200
    requests = {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for sample in families((await api.client.get("/metrics")).text)["sidecar_requests"].samples
        if sample.name == "sidecar_requests_total"
    }
    assert requests == {
        ("other", "404"): 1,
        ("events", "401"): 1,
        ("resume", "401"): 1,
        ("task-status", "200"): 1,
    }


def test_each_refusal_is_counted_by_its_reason_or_upstream() -> None:
    metrics = Metrics()
    refusals: list[ApiError] = [
        Unauthorized(reason="expired"),
        Unauthorized(reason="backend_unauthorized"),
        Unavailable(reason="redis_timeout"),
        Unavailable(reason="redis_error"),
        Unavailable(reason="jwks"),
        Unavailable(reason="backend"),
        # The service's own refusals: in sidecar_requests_total alone.
        BadRequest(),
        Forbidden(),
        NotFound(),
    ]
    for refusal in refusals:
        metrics.count_refusal(refusal)
    counted = {
        (sample.name, *sample.labels.values()): sample.value
        for family in metrics.registry.collect()
        if family.name in ("sidecar_auth_failures", "sidecar_redis_errors", "sidecar_upstream_errors")
        for sample in family.samples
    }
    assert counted == {
        ("sidecar_auth_failures_total", "expired"): 1,
        ("sidecar_auth_failures_total", "backend_unauthorized"): 1,
        ("sidecar_redis_errors_total", "timeout"): 1,
        ("sidecar_redis_errors_total", "error"): 1,
        ("sidecar_upstream_errors_total", "jwks"): 1,
        ("sidecar_upstream_errors_total", "backend"): 1,
    }


async def test_a_refused_request_leaves_no_garbage(api: Api) -> None:
    """A refusal is freed with its request, not left in a reference cycle to the cyclic
    garbage collector (whose pauses every polled 401 or 404 would then add to)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": f"{api.settings.api_prefix}/conversations/{CONV}/active-session",
        "raw_path": b"",
        "query_string": b"",
        "root_path": "",
        "headers": [],  # no token: 401
        "client": ("127.0.0.1", 1),
        "server": ("sidecar", 80),
    }
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await api.app(dict(scope), receive, send)
    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            await api.app(dict(scope), receive, send)
        left = gc.collect()
    finally:
        gc.enable()
    assert set(statuses) == {401}
    assert left < 50, left  # a cycle per request would leave over 1,000


async def test_metrics_an_operator_expects(api: Api) -> None:
    await api.get(CONV, "task-status")
    text = (await api.client.get("/metrics")).text
    found = families(text)
    # The process, platform and GC collectors, on the service's own registry.
    (rss,) = found["process_resident_memory_bytes"].samples
    assert rss.value > 1_000_000
    assert found["python_info"].samples
    assert found["python_gc_objects_collected"].samples
    (build,) = found["sidecar_build_info"].samples
    assert (build.labels, build.value) == ({"version": __version__}, 1.0)
    assert "_created" not in text
    # No index here (scan mode): its size and lag are NaN, not a reassuring 0.
    for name in ("sidecar_index_lag_seconds", "sidecar_index_runs"):
        (sample,) = found[name].samples
        assert math.isnan(sample.value), name


async def test_index_lag_is_a_reading_when_there_is_an_index(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    async for api in open_api(make_settings(index_mode="index")):
        for _ in range(100):
            if (await api.client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        found = families((await api.client.get("/metrics")).text)
        (lag,) = found["sidecar_index_lag_seconds"].samples
        assert 0 <= lag.value < 60
        (runs,) = found["sidecar_index_runs"].samples
        assert runs.value == 0


async def test_metrics_negotiate_openmetrics_and_gzip(api: Api) -> None:
    plain = await api.client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200
    assert plain.headers["content-type"].startswith("text/plain")
    assert "content-encoding" not in plain.headers
    assert "# EOF" not in plain.text

    accept = {"Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "identity"}
    openmetrics = await api.client.get("/metrics", headers=accept)
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    assert "sidecar_build_info" in openmetrics.text

    async with api.client.stream("GET", "/metrics", headers={"Accept-Encoding": "gzip"}) as zipped:
        assert zipped.headers["content-encoding"] == "gzip"
        raw = b"".join([chunk async for chunk in zipped.aiter_raw()])
    assert b"sidecar_build_info" in gzip.decompress(raw)
    assert zipped.headers["x-request-id"]  # still behind the request-id middleware


# --- logs ----------------------------------------------------------------------------------------------


def test_json_lines_carry_rfc3339_time_service_and_version() -> None:
    record = logging.LogRecord("session_sidecar.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.created = 1704110400.1239
    entry = json.loads(JsonFormatter().format(record))
    assert entry["ts"] == "2024-01-01T12:00:00.123+00:00"
    assert datetime.fromisoformat(entry["ts"]).utcoffset() is not None
    assert (entry["service"], entry["version"]) == ("session-sidecar", __version__)
    assert (entry["level"], entry["logger"], entry["msg"]) == ("warning", "session_sidecar.x", "hello you")


async def test_one_json_log_line_per_request_without_the_token(
    api: Api, sim: BackendSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    await sim.full_run(CONV, "alice", "m", status=None)
    secret_token = token("alice")
    with caplog.at_level(logging.INFO):  # every logger, not only the access log
        response = await api.client.get(
            f"/api/v1/conversations/{CONV}/active-session",
            headers={"Authorization": f"Bearer {secret_token}", "X-Request-ID": "req-1"},
        )
        await api.client.get(
            f"/api/v1/conversations/{CONV}/task-status", headers={"Authorization": "Bearer bad"}
        )
    assert response.status_code == 200
    # A refused token is one line too: the access line, with the reason. (httpx: the test's client.)
    records = [r for r in caplog.records if r.name != "httpx"]
    assert [r.name for r in records] == ["session_sidecar.access"] * 2
    lines = [JsonFormatter().format(r) for r in records]
    first, second = (json.loads(line) for line in lines)
    assert first["request_id"] == "req-1" and first["route"] == "active-session"
    assert first["status"] == 200 and first["user_id"] == "alice" and first["latency_ms"] >= 0
    assert second["status"] == 401 and second["reason"] == "malformed"
    for line in lines:
        assert secret_token not in line and "Bearer" not in line and CONV not in line


def _json_lines(path: Path) -> list[dict[str, Any]]:
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}\n{path.read_text()}")
    return entries


def _env(**settings: str) -> dict[str, str]:
    # Nothing of the caller's SIDECAR_* or warning filters leaks into the child.
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_") and k != "PYTHONWARNINGS"}
    return base | settings


@contextlib.contextmanager
def serving(log: Path, **settings: str) -> Iterator[str]:
    """`session-sidecar serve` on a free loopback port, its stdout and stderr into `log`;
    yields its base URL, then stops it with SIGTERM."""
    port = free_port()
    env = _env(SIDECAR_HOST="127.0.0.1", SIDECAR_PORT=str(port), **settings)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "session_sidecar", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve did not come up:\n{log.read_text()}")
            time.sleep(0.02)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_serve_logs_json_only_with_warnings_and_one_line_per_request(redis_url: str, tmp_path: Path) -> None:
    short_secret = "only-20-bytes-secret"  # below PyJWT's HS256 minimum: it warns on every key use
    log = tmp_path / "serve.log"
    settings = {"SIDECAR_JWT_SECRET": short_secret, "SIDECAR_ACCESS_POLICY": "run-owner"}
    with serving(log, SIDECAR_REDIS_URL=redis_url, SIDECAR_INDEX_MODE="scan", **settings) as base:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
            weak = token("alice", secret=short_secret)
        path = f"{base}/api/v1/conversations/{uuid.uuid4()}/task-status"  # no run: 404
        accepted = httpx.get(path, headers={"Authorization": f"Bearer {weak}", "X-Request-ID": "ok-1"})
        assert accepted.status_code == 404
        refused = httpx.get(path, headers={"Authorization": "Bearer bad", "X-Request-ID": "refused-1"})
        assert refused.status_code == 401
    entries = _json_lines(log)  # every line, uvicorn's and the warning's included
    for entry in entries:
        assert RFC3339_MS.fullmatch(entry["ts"]), entry
        assert (entry["service"], entry["version"]) == ("session-sidecar", __version__), entry
    messages = [entry["msg"] for entry in entries]
    start = next(i for i, m in enumerate(messages) if m.startswith("Uvicorn running on"))
    stop = messages.index("Shutting down")
    # While serving: one access line per request, and PyJWT's warning as a JSON record.
    during = entries[start + 1 : stop]
    assert Counter(e["logger"] for e in during) == {"session_sidecar.access": 2, "py.warnings": 1}, during
    (warning,) = [e for e in during if e["logger"] == "py.warnings"]
    assert warning["level"] == "warning" and "InsecureKeyLengthWarning" in warning["msg"]
    (refusal,) = [e for e in during if e.get("request_id") == "refused-1"]
    assert (refusal["status"], refusal["reason"]) == (401, "malformed")


def test_demo_shows_its_access_log(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "session_sidecar", "demo", "--port", str(port)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        banner = ""
        deadline = time.monotonic() + 30
        while "Ctrl-C" not in banner and proc.poll() is None and time.monotonic() < deadline:
            banner += proc.stdout.readline()
        curl = re.search(r"curl (http://\S+/active-session)", banner)
        assert curl, banner + log.read_text()
        assert httpx.get(curl[1], timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=15)
    access = [e for e in _json_lines(log) if e["logger"] == "session_sidecar.access"]
    assert [(e["route"], e["status"]) for e in access] == [("active-session", 200)], access


# --- OpenAPI and the docs page -------------------------------------------------------------------------


def _statuses(schema: dict[str, Any]) -> dict[str, set[str]]:
    return {path: set(op["get"]["responses"]) for path, op in schema["paths"].items()}


def test_openapi_is_valid_3_1_and_generated_from_the_types() -> None:
    schema = openapi_schema("/api/v1", "0.1.0", DEFAULT_CONVERSATION_ID_PATTERN)
    validate(schema)  # raises on an invalid OpenAPI 3.1 document
    active = schema["components"]["schemas"]["ActiveSession"]
    assert list(active["properties"]) == [
        "sessionId",
        "status",
        "cursor",
        "conversationId",
        "startedAt",
        "lastActivity",
    ]
    assert active["properties"]["status"]["enum"] == ["active", "completed", "idle"]
    task = schema["components"]["schemas"]["TaskStatus"]
    assert list(task["properties"]) == ["isActive", "sessionId", "estimatedCompletion", "conversationId"]
    assert set(schema["components"]["schemas"]["ErrorBody"]["required"]) == {"error", "conversationId"}


def test_openapi_documents_operations_parameters_fields_and_headers() -> None:
    schema = openapi_schema("/api/v1", "0.1.0", r"^[a-z0-9-]{1,36}$")
    validate(schema)
    assert [server["url"] for server in schema["servers"]] == ["/api/v1"]
    operations = {path: item["get"] for path, item in schema["paths"].items()}
    assert {path: op["operationId"] for path, op in operations.items()} == {
        "/conversations/{conversation_id}/active-session": "getActiveSession",
        "/conversations/{conversation_id}/task-status": "getTaskStatus",
    }
    headers = schema["components"]["headers"]
    for op in operations.values():
        parameter, *watch = op["parameters"]
        assert [(w["name"], w["in"]) for w in watch] == [
            ("wait", "query"),
            ("since", "query"),
            ("If-None-Match", "header"),
            ("Prefer", "header"),
        ]
        assert parameter["schema"] == {
            "type": "string",
            "pattern": r"^[a-z0-9-]{1,36}$",
            "minLength": 1,
            "maxLength": 36,
        }
        for status, response in op["responses"].items():
            named = {ref["$ref"].rsplit("/", 1)[1] for ref in response["headers"].values()}
            assert named <= set(headers)
            assert {"X-Request-ID", "Cache-Control"} <= named, status
            assert ("WWW-Authenticate" in named) == (status == "401"), status
            assert ("Retry-After" in named) == (status == "503"), status
            assert ("ETag" in named) == (status in ("200", "304", "404")), status
        assert "content" not in op["responses"]["304"]
    components = schema["components"]["schemas"]
    for name in ("ActiveSession", "TaskStatus", "ErrorBody"):
        assert components[name]["description"]
        for field, prop in components[name]["properties"].items():
            assert prop.get("description"), (name, field)
    millis = [
        ("ActiveSession", "startedAt"),
        ("ActiveSession", "lastActivity"),
        ("TaskStatus", "estimatedCompletion"),
    ]
    for name, field in millis:
        assert (
            "milliseconds since the unix epoch"
            in components[name]["properties"][field]["description"].lower()
        )
    # An unbounded pattern has no maxLength to state.
    unbounded = openapi_schema("/api/v1", "0.1.0", r"^[a-z]+$")
    parameter, *_ = unbounded["paths"]["/conversations/{conversation_id}/task-status"]["get"]["parameters"]
    assert "maxLength" not in parameter["schema"]


async def test_openapi_served_with_the_configured_prefix_and_pattern(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    settings = make_settings(api_prefix="/chat/v2", conversation_id_pattern=r"^[0-9a-f-]{36}$")
    async for api in open_api(settings):
        served = (await api.client.get("/openapi.json")).json()
        assert served == json.loads(json.dumps(openapi_schema("/chat/v2", __version__, r"^[0-9a-f-]{36}$")))
        assert served["servers"][0]["url"] == "/chat/v2"
        operation = served["paths"]["/conversations/{conversation_id}/active-session"]["get"]
        parameter, *_ = operation["parameters"]
        assert (parameter["schema"]["minLength"], parameter["schema"]["maxLength"]) == (36, 36)


async def test_every_documented_status_and_header_is_producible(api: Api, sim: BackendSimulator) -> None:
    served = (await api.client.get("/openapi.json")).json()
    documented = _statuses(served)
    assert all(codes == {"200", "304", "400", "401", "403", "404", "503"} for codes in documented.values())
    await sim.full_run(CONV, "alice", "m", status=None)
    produced = set()
    for endpoint in ("active-session", "task-status"):
        for conversation, user in (
            (CONV, "alice"),
            ("bad:id", "alice"),
            (CONV, None),
            ("nothing-here", "alice"),
        ):
            response = await api.get(conversation, endpoint, user=user)
            produced.add(str(response.status_code))
            assert response.headers["x-request-id"] and response.headers["cache-control"] == "no-store"
            assert ("www-authenticate" in response.headers) == (response.status_code == 401)
    assert produced == {"200", "400", "401", "404"}
    # 403 and 503 (with Retry-After) are produced in test_access_backend.py and test_redis_outage.py,
    # 304 (If-None-Match with Prefer: wait) in test_watch.py.


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_docs_page_is_served_and_self_contained(api: Api) -> None:
    page = await api.client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    # Nothing loaded from elsewhere: no external script, style, image or frame, no URL at all.
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", html, re.IGNORECASE)
    assert not re.search(r"https?://", html)
    # Its own CSP admits exactly its inline script and style, and requests to this origin.
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.DOTALL)
    assert f"script-src {_csp_hash(script)}" in csp and f"style-src {_csp_hash(style)}" in csp
    # The page reads the document next to it, which is there.
    assert 'fetch("openapi.json")' in script
    assert (await api.client.get("/openapi.json")).status_code == 200


def test_docs_page_lists_the_operations_in_a_real_browser(redis_url: str, tmp_path: Path) -> None:
    """Its script runs under its own CSP and renders /openapi.json (Chromium, as in test_browser)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `./dev test` installs it (as root: apt-get install chromium)")
    settings = {"SIDECAR_JWT_SECRET": "x" * 40, "SIDECAR_ACCESS_POLICY": "run-owner"}
    with serving(tmp_path / "serve.log", SIDECAR_REDIS_URL=redis_url, **settings) as base:
        done = subprocess.run(
            [
                chromium,
                *("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"),
                *(
                    "--no-first-run",
                    "--disable-component-update",
                    "--disable-sync",
                    "--enable-logging=stderr",
                ),
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"{base}/docs",
            ],
            capture_output=True,
            text=True,
            timeout=45,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    dom = done.stdout
    assert "Refused to" not in done.stderr, done.stderr[-3000:]  # no CSP violation
    assert f"session-sidecar {__version__}" in dom
    assert "getActiveSession" in dom and "getTaskStatus" in dom, dom
    assert "/api/v1/conversations/{conversation_id}/active-session" in dom
    assert "milliseconds since the Unix epoch" in dom
    assert "Retry-After" in dom and "Send" in dom
