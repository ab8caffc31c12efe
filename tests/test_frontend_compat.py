"""What the real web frontend needs (SPEC sections 1, 2 and 5): CORS, runs it names itself,
reservation keys that are not runs, and the cursor it resumes from. Real Redis throughout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import Api, auth, open_api

CONV = "019953dd-6de7-7f7a-bf64-96c54db89201"
APP_ORIGIN = "https://app.example"
PREFLIGHT = {
    "Origin": APP_ORIGIN,
    "Access-Control-Request-Method": "GET",
    "Access-Control-Request-Headers": "authorization,x-request-id",
}


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
async def cors_api(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> AsyncIterator[Api]:
    async for api in open_api(make_settings(cors_allowed_origins=f"{APP_ORIGIN}, http://localhost:3000")):
        yield api


def path(api: Api, endpoint: str, conversation: str = CONV) -> str:
    return f"{api.settings.api_prefix}/conversations/{conversation}/{endpoint}"


async def test_preflight_needs_no_token_and_counts_no_auth_failure(cors_api: Api) -> None:
    for endpoint in ("active-session", "task-status"):
        response = await cors_api.client.options(path(cors_api, endpoint), headers=PREFLIGHT)
        assert response.status_code == 200, response.text
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "GET" in response.headers["access-control-allow-methods"]
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
    metrics = (await cors_api.client.get("/metrics")).text
    assert "sidecar_auth_failures_total{" not in metrics


async def test_answers_to_an_allowed_origin_carry_cors_headers(cors_api: Api, sim: BackendSimulator) -> None:
    run_id = await sim.full_run(CONV, "alice", "m1", status=None)
    headers = {"Origin": APP_ORIGIN, **auth("alice")}
    for endpoint, status in (("active-session", 200), ("task-status", 200)):
        response = await cors_api.client.get(path(cors_api, endpoint), headers=headers)
        assert response.status_code == status
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "etag" in response.headers["access-control-expose-headers"].lower()
    # Refusals too: a browser script can only read a 401/404/503 body with these headers.
    refused = await cors_api.client.get(path(cors_api, "active-session"), headers={"Origin": APP_ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == APP_ORIGIN
    assert run_id


async def test_an_origin_not_allowed_gets_the_normal_answer_without_cors_headers(
    cors_api: Api, sim: BackendSimulator
) -> None:
    await sim.full_run(CONV, "alice", "m1", status=None)
    headers = {"Origin": "https://evil.example", **auth("alice")}
    response = await cors_api.client.get(path(cors_api, "active-session"), headers=headers)
    assert response.status_code == 200 and response.json()["status"] == "active"
    assert "access-control-allow-origin" not in response.headers


async def test_refused_or_odd_preflights_keep_the_flat_body_and_never_500(cors_api: Api) -> None:
    evil = {**PREFLIGHT, "Origin": "https://evil.example"}
    refused = await cors_api.client.options(path(cors_api, "active-session"), headers=evil)
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/json"
    assert refused.json() == {"error": "Disallowed CORS origin", "conversationId": None}
    assert "access-control-allow-origin" not in refused.headers
    for odd in ("/api/v1/nowhere", "/api/v1/conversations/a:b/active-session", "/%ff"):
        response = await cors_api.client.options(odd, headers=PREFLIGHT)
        assert response.status_code == 200, (odd, response.status_code)
    # An OPTIONS that is not a preflight is a plain wrong method, flat body.
    plain = await cors_api.client.options(path(cors_api, "task-status"))
    assert plain.status_code == 405 and plain.json()["conversationId"] == CONV


async def test_development_mode_without_backend_shows_runs_the_frontend_names(
    make_settings: Callable[..., Settings], sim: BackendSimulator
) -> None:
    frontend_run = await sim.new_frontend_run(CONV)
    await sim.start(CONV, frontend_run)
    await sim.chunk(CONV, frontend_run, "hello")
    dev = make_settings(access_policy=None, development_mode=True, default_username="dev-user")
    assert dev.policy == "single-user"
    async for api in open_api(dev):
        body = (await api.get(CONV, "active-session", user=None)).json()
        assert (body["sessionId"], body["status"]) == (frontend_run, "active")
        assert body["sessionId"].startswith("conversation:current_user_id:")
    # Named explicitly, run-owner hides them: the web frontend's runs carry no user id.
    owner = make_settings(access_policy="run-owner", development_mode=True, default_username="dev-user")
    async for api in open_api(owner):
        assert (await api.get(CONV, "active-session", user=None)).status_code == 404


async def test_reservation_keys_are_not_runs(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    prefix = make_settings().stream_prefix
    # A reserved id whose stream does not exist yet: nothing to answer, for any mode.
    await redis_client.set(f"{prefix}:reservation:{CONV}:conversation:alice:m9", "1", ex=120)
    for mode in ("scan", "index"):
        async for api in open_api(make_settings(index_mode=mode)):
            await _until_ready(api)
            assert (await api.get(CONV, "active-session")).status_code == 404
            assert (await api.get("reservation", "active-session")).status_code == 404
            index = api.app.state.sidecar.index
            assert index is None or index.size == 0
    # Once the run really starts, it is the answer (and its reservation stays ignored).
    run_id = await sim.full_run(CONV, "alice", "m9", status=None)
    async for api in open_api(make_settings(index_mode="index")):
        await _until_ready(api)
        assert (await api.get(CONV, "active-session")).json()["sessionId"] == run_id
        assert api.app.state.sidecar.index.size == 1


async def test_conversation_reservation_reads_no_key(api: Api, redis_client: aioredis.Redis) -> None:
    await redis_client.set("chat:stream:reservation:other:conversation:alice:m1", "1", ex=120)
    await redis_client.config_resetstat()
    for endpoint in ("active-session", "task-status"):
        assert (await api.get("reservation", endpoint)).status_code == 404
    stats = await redis_client.info("commandstats")
    reads = ("scan", "xinfo|stream", "xrange", "xrevrange", "get", "pttl")
    read = {name for name in stats if name.split("_", 1)[-1] in reads}
    assert not read, read


@pytest.mark.parametrize("choice", ["last", "first"])
async def test_active_cursor_setting(
    make_settings: Callable[..., Settings], sim: BackendSimulator, choice: str
) -> None:
    t0 = now_ms() - 5000
    await sim.full_run(CONV, "alice", "m1", chunks=3, status=None, start_ms=t0)
    queued = await sim.new_run("queued-conv", "alice", "m2")
    await sim.queue("queued-conv", queued)
    await sim.client.delete(sim.stream_key("queued-conv", queued))  # a status key, no stream yet
    async for api in open_api(make_settings(active_cursor=choice)):
        body = (await api.get(CONV, "active-session")).json()
        assert body["cursor"] == (f"{t0 + 4 * 200}-0" if choice == "last" else f"{t0}-0")
        assert (body["startedAt"], body["lastActivity"]) == (t0, t0 + 4 * 200)  # unchanged by the choice
        assert (await api.get("queued-conv", "active-session")).json()["cursor"] == "0-0"


async def _until_ready(api: Api) -> None:
    deadline = time.monotonic() + 5
    while (await api.client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, "not ready in time"
        await asyncio.sleep(0.02)
