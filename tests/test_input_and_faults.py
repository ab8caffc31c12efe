"""Bad input and bad data: the right status, the flat body, never a 500, never a leak."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import quote

import pytest
import redis.asyncio as aioredis

from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.store.facts import ScanFinder
from session_sidecar.store.keys import KeySchema, glob_escape
from tests.conftest import Api, auth, open_api

CONV = "conv-1"
GLOB_PATTERN = r"^[A-Za-z0-9._*?\[\]\\-]{1,128}$"


@pytest.mark.parametrize(
    "bad_id",
    ["a:b", "conv:1", "x" * 129, "a b", "a%2Fb", "ü", "a*", "a?b", "[ab]", "a\\b", "a\nb"],
)
async def test_malformed_conversation_id_is_400(api: Api, bad_id: str) -> None:
    path = f"/api/v1/conversations/{quote(bad_id, safe='')}/active-session"
    response = await api.client.get(path, headers=auth("alice"))
    assert response.status_code == 400, bad_id
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {
        "error": "Malformed conversation id",
        "conversationId": bad_id,
    }


async def test_colon_refused_even_if_a_pattern_admits_it(make_settings: Callable[..., Settings]) -> None:
    # The settings refuse such a pattern at start; the route checks again regardless.
    async for api in open_api(make_settings()):
        api.app.state.sidecar.id_pattern = re.compile(r"^.+$")
        response = await api.get("a:b", "task-status")
        assert response.status_code == 400


async def test_no_token_is_401_with_challenge(api: Api) -> None:
    response = await api.get(CONV, "active-session", user=None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer realm=")
    assert response.json()["conversationId"] == CONV
    assert set(response.json()) == {"error", "conversationId"}


@pytest.mark.parametrize("header", ["Bearer garbage", "Basic dXNlcjpwYXNz", "Bearer", "Bearer a b"])
async def test_bad_token_is_401_invalid_token(api: Api, header: str) -> None:
    response = await api.client.get(
        f"/api/v1/conversations/{CONV}/active-session", headers={"Authorization": header}
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert response.json()["conversationId"] == CONV


async def test_401_comes_before_any_redis_read(api: Api, sim: BackendSimulator) -> None:
    await sim.full_run(CONV, "alice", "m", status=None)
    response = await api.get(CONV, "active-session", user=None)
    assert response.status_code == 401 and "alice" not in response.text


async def test_development_mode_without_token(
    make_settings: Callable[..., Settings], sim: BackendSimulator
) -> None:
    run_id = await sim.full_run(CONV, "dev-user", "m", status=None)
    settings = make_settings(jwt_secret=None, development_mode=True, default_username="dev-user")
    async for api in open_api(settings):
        response = await api.get(CONV, "active-session", user=None)
        assert response.status_code == 200 and response.json()["sessionId"] == run_id
        # A token that is sent is still verified, even in development mode.
        response = await api.client.get(
            f"/api/v1/conversations/{CONV}/active-session", headers={"Authorization": "Bearer junk"}
        )
        assert response.status_code == 401


async def test_unknown_path_and_method_keep_flat_body(api: Api) -> None:
    response = await api.client.get("/api/v1/conversations/x/nope")
    assert response.status_code == 404 and set(response.json()) == {"error", "conversationId"}
    response = await api.client.post(f"/api/v1/conversations/{CONV}/task-status")
    assert response.status_code == 405
    assert response.json()["conversationId"] == CONV


@pytest.mark.parametrize("glob_id", ["*", "conv-?", "conv-[12]", "conv\\-1", "[c]*", "c*"])
async def test_glob_characters_never_match_another_conversation(
    make_settings: Callable[..., Settings], sim: BackendSimulator, glob_id: str
) -> None:
    for conv in ("conv-1", "conv-2", "conv\\x", "c"):
        await sim.full_run(conv, "alice", "m", status=None)
    async for api in open_api(make_settings(conversation_id_pattern=GLOB_PATTERN)):
        path = f"/api/v1/conversations/{quote(glob_id, safe='')}/active-session"
        response = await api.client.get(path, headers=auth("alice"))
        assert response.status_code == 404, response.text


async def test_glob_id_finds_its_own_runs(redis_client: aioredis.Redis, sim: BackendSimulator) -> None:
    for conv in ("a*", "ab", "a[b]", "a\\b", "ab2"):
        await sim.full_run(conv, "alice", f"m-{len(conv)}", status=None)
    finder = ScanFinder(redis_client, KeySchema("chat:stream"))
    assert await finder.run_ids("a*") == {"conversation:alice:m-2"}
    assert await finder.run_ids("a[b]") == {"conversation:alice:m-4"}
    assert await finder.run_ids("a\\b") == {"conversation:alice:m-3"}


def test_glob_escape() -> None:
    assert glob_escape("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"
    assert glob_escape("plain-id_1.2") == "plain-id_1.2"


async def test_wrongtype_keys_are_no_500(
    api: Api, redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    # A string where a stream belongs, and a hash where a status string belongs.
    await redis_client.set(f"chat:stream:{CONV}:conversation:alice:s", "not a stream")
    await redis_client.hset(f"task:status:{CONV}:conversation:alice:h", "status", "running")
    response = await api.get(CONV, "active-session")
    assert response.status_code == 404  # neither is a readable run
    run_id = await sim.full_run(CONV, "alice", "good", status=None)
    for endpoint in ("active-session", "task-status"):
        response = await api.get(CONV, endpoint)
        assert response.status_code == 200 and response.json()["sessionId"] == run_id


async def test_non_utf8_bytes_are_no_500(
    api: Api, redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    await redis_client.set(f"task:status:{CONV}:conversation:alice:bin", b"\xff\xfe")
    await redis_client.xadd(f"chat:stream:{CONV}:conversation:alice:bin", {b"type": b"\xc3\x28"})
    await redis_client.set(f"task:status:{CONV}:conversation:alice:\xff".encode("latin-1"), "running")
    await redis_client.set(b"task:status:" + CONV.encode() + b":conversation:alice:\xff\xfe", "running")
    for endpoint in ("active-session", "task-status"):
        response = await api.get(CONV, endpoint)
        assert response.status_code == 200, response.text
    body = (await api.get(CONV, "active-session")).json()
    assert body["sessionId"] == "conversation:alice:bin" and body["status"] == "idle"
    del sim


async def test_unknown_status_and_event_types_are_no_500(
    api: Api, redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    run_id = await sim.full_run(CONV, "alice", "m", chunks=1, status=None)
    await sim.xadd(CONV, run_id, "heartbeat", {"note": "new event type"})
    assert (await api.get(CONV, "active-session")).json()["status"] == "active"
    await sim.set_status(CONV, run_id, "paused-by-future-backend")
    response = await api.get(CONV, "task-status")
    assert response.status_code == 200 and response.json()["isActive"] is False


async def test_empty_stream_with_status(api: Api, redis_client: aioredis.Redis) -> None:
    key = f"chat:stream:{CONV}:conversation:alice:e"
    await redis_client.xadd(key, {"type": "start"})
    await redis_client.xtrim(key, maxlen=0)
    await redis_client.set(f"task:status:{CONV}:conversation:alice:e", "running", ex=600)
    body = (await api.get(CONV, "active-session")).json()
    assert body["cursor"] == "0-0" and body["status"] == "active"
