"""`session-sidecar demo`: an embedded Redis, a simulated backend writing live runs, the service.

Everything runs in this process (the Redis server is a child that dies with
it), so Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import sys

import msgspec
import redis.asyncio as aioredis
import uvicorn

from session_sidecar.embedded import EmbeddedRedis
from session_sidecar.errors import ConfigError
from session_sidecar.observability import configure_logging
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator, Naming, Outcome, conversation_id, live_run

DEMO_USER = "demo-user"
OTHER_USERS = ("alice", "bob")
# Most runs are named by the web frontend (`conversation:current_user_id:{ms}`); regenerates
# and API clients get the backend's `conversation:{user}:...` ids.
NAMINGS: tuple[Naming, ...] = ("frontend",) * 7 + ("regenerate",) * 2 + ("message",)
# `stopped` deletes the run on newer backends and leaves it `running` on old ones.
OUTCOMES: tuple[Outcome, ...] = ("completed",) * 14 + ("stopped",) * 3 + ("error",) * 2 + ("crashed",)


async def featured_conversation(sim: BackendSimulator, conversation: str, user: str) -> None:
    """Back-to-back long runs from the web frontend, so the printed curl lines find an active
    run at any moment (never stopped: a stopped run vanishes)."""
    while True:
        await live_run(sim, conversation, user, chunks=random.randint(150, 400), naming="frontend")


async def background_conversation(sim: BackendSimulator, conversation: str, user: str) -> None:
    while True:
        await asyncio.sleep(random.uniform(2, 6))
        await live_run(
            sim,
            conversation,
            user,
            chunks=random.randint(10, 60),
            outcome=random.choice(OUTCOMES),
            naming=random.choice(NAMINGS),
        )


async def run_world(client: aioredis.Redis, conversations: int, stream_prefix: str, featured: str) -> None:
    """The featured conversation for the demo user, plus others across users and backend versions."""
    tasks = [
        asyncio.create_task(
            featured_conversation(BackendSimulator(client, stream_prefix=stream_prefix), featured, DEMO_USER)
        )
    ]
    for i in range(conversations):
        sim = BackendSimulator(client, stream_prefix=stream_prefix, old_backend=i % 3 == 2)
        user = (DEMO_USER, *OTHER_USERS)[i % 3]
        tasks.append(asyncio.create_task(background_conversation(sim, conversation_id(), user)))
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def simulate(redis_url: str, conversations: int, stream_prefix: str) -> None:
    """`session-sidecar simulate`: the backend stand-in alone, for docker-compose."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        featured = conversation_id()
        print(f"simulating; featured conversation {featured} (user {DEMO_USER})", flush=True)
        await run_world(client, conversations, stream_prefix, featured)
    finally:
        await client.aclose()


def _demo_settings(overrides: dict[str, object], redis_url: str) -> Settings:
    env = dict(os.environ)
    env.setdefault("SIDECAR_HOST", "127.0.0.1")  # development mode: no token needed, so loopback
    env["isDevelopmentMode"] = "enabled"
    env.setdefault("defaultUsername", DEMO_USER)
    env["SIDECAR_REDIS_URL"] = redis_url
    settings = msgspec.structs.replace(Settings.from_env(env), **overrides)
    settings.validate()
    return settings


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def run_demo(overrides: dict[str, object]) -> int:
    with EmbeddedRedis() as server:
        settings = _demo_settings(overrides, server.url)
        if not _port_free(settings.host, settings.port):
            raise ConfigError(
                f"port {settings.port} on {settings.host} is in use: set SIDECAR_PORT or --port"
            )
        configure_logging("info")  # a newcomer trying the curl lines sees each request
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_demo(settings, server))
    return 0


async def _demo(settings: Settings, server: EmbeddedRedis) -> None:
    from session_sidecar.app import create_app
    from session_sidecar.cli import uvicorn_config

    client = aioredis.Redis.from_url(server.url)
    featured = conversation_id()
    world = asyncio.create_task(run_world(client, 6, settings.stream_prefix, featured))
    web = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    serving = asyncio.create_task(web.serve())
    while not web.started and not serving.done():  # noqa: ASYNC110 (uvicorn offers only a flag)
        await asyncio.sleep(0.05)
    if web.started:
        _banner(settings, server, featured)
    try:
        await serving
    finally:
        world.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await world
        await client.aclose()


def _banner(settings: Settings, server: EmbeddedRedis, featured: str) -> None:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    base = f"http://{host}:{settings.port}"
    conv = f"{base}{settings.api_prefix}/conversations/{featured}"
    binary = os.path.basename(server.binary or "")
    print(
        f"""
session-sidecar demo
  Redis ({binary}, embedded):   {server.url}
  Sidecar:                      {base}
  Development mode: requests without a token act as user '{settings.default_username}'.
  A simulated backend writes live runs for several users: most named by the web frontend,
  some regenerated, some stopped (and deleted, as the backend does), some failing.

Try (this conversation has a run streaming right now):
  curl {conv}/active-session
  curl {conv}/task-status
  curl {base}/metrics
  curl {base}/openapi.json

Ctrl-C stops everything.
""",
        file=sys.stdout,
        flush=True,
    )
