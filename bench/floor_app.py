"""(c) The floor: the least work any correct answer needs.

A bare Starlette handler that verifies the same HS256 token with PyJWT and
makes exactly one pipelined Redis round trip (`XREVRANGE key + - COUNT 1` and
`GET task:status:...`) for a stream key it is *told* (a conversation -> key
mapping written by the fill step and loaded at start-up). No key discovery,
no access policy, no derivation rules: nothing a real service could do with
less Redis work or less Python.

Run: `uvicorn bench.floor_app:app --workers 1` with `BENCH_REDIS_URL`,
`BENCH_JWT_SECRET` and `BENCH_FLOOR_MAP` (the fill step's JSON) set.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.common import API_PREFIX, JWT_SECRET

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = os.environ.get("BENCH_JWT_SECRET", JWT_SECRET)
MAP_PATH = os.environ.get("BENCH_FLOOR_MAP", "")

_state: dict[str, Any] = {}


def _load_map(path: str) -> dict[str, tuple[str, str, str]]:
    """conversation -> (stream key, status key, run id) of the run that answers."""
    if not path:
        return {}
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return {conv: (k["stream"], k["status"], k["run"]) for conv, k in data["floor"].items()}


@asynccontextmanager
async def lifespan(_app: Starlette) -> AsyncIterator[None]:
    # BENCH_REDIS_CLUSTER=1 (`bench.run --cluster`): the pipeline then goes to each key's primary.
    cluster = os.environ.get("BENCH_REDIS_CLUSTER") == "1"
    client = (aioredis.RedisCluster if cluster else aioredis.Redis).from_url(REDIS_URL, socket_timeout=5)
    _state["redis"] = client
    _state["map"] = _load_map(MAP_PATH)
    try:
        yield
    finally:
        await client.aclose()


def _error(status: int, message: str, conversation_id: str) -> JSONResponse:
    return JSONResponse({"error": message, "conversationId": conversation_id}, status_code=status)


async def active_session(request: Request) -> JSONResponse:
    conversation_id: str = request.path_params["conversation_id"]
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return _error(401, "Missing bearer token", conversation_id)
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.PyJWTError:
        return _error(401, "Invalid token", conversation_id)
    if "user_id" not in claims:
        return _error(401, "Invalid token", conversation_id)
    keys = _state["map"].get(conversation_id)
    if keys is None:
        return _error(404, "No active session found", conversation_id)
    stream_key, status_key, run_id = keys
    client: aioredis.Redis | aioredis.RedisCluster = _state["redis"]
    async with client.pipeline(transaction=False) as pipe:
        pipe.xrevrange(stream_key, "+", "-", count=1)
        pipe.get(status_key)
        last, status = await pipe.execute()
    if not last:
        return _error(404, "No active session found", conversation_id)
    entry_id: bytes = last[0][0]
    fields: dict[bytes, bytes] = last[0][1]
    cursor = entry_id.decode()
    ms = int(cursor.split("-", 1)[0])
    finished = fields.get(b"type") == b"end" or status in (b"completed", b"error", b"cancelled")
    return JSONResponse(
        {
            "sessionId": run_id,
            "status": "completed" if finished else "active",
            "cursor": cursor,
            "conversationId": conversation_id,
            "startedAt": ms,
            "lastActivity": ms,
        }
    )


async def healthz(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route(API_PREFIX + "/conversations/{conversation_id}/active-session", active_session),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)
