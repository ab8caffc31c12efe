"""(a) The baseline: the in-backend `active-session` endpoint that session-sidecar replaces.

A faithful rendition of what the chat backend did per request, bugs included,
so the benchmark compares against what a user would otherwise deploy:

* FastAPI, one uvicorn worker, a *synchronous* `def` endpoint (so it runs in
  Starlette's threadpool) and a synchronous `redis.Redis` client;
* `KEYS chat:stream:{conversation_id}:*` on every request (O(keyspace) inside
  Redis, which blocks every other client while it walks the keyspace);
* the run id taken as the *last* colon-separated part of the key (a bug: run
  ids contain colons), so the `task:status:...` key it reads never exists;
* the stream's last entry read with `XREVRANGE ... COUNT 1`;
* `startedAt` / `lastActivity` invented from the clock;
* 404 when Redis is down.

Where the original is not known in detail, the cheaper choice is taken so the
baseline is, if anything, flattered: one stream (the first key `KEYS` returns)
is read, and token verification runs as an `async` dependency (no extra
threadpool hop).

Run: `uvicorn bench.baseline_app:app --workers 1` with `BENCH_REDIS_URL` and
`BENCH_JWT_SECRET` set.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import jwt
import redis
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse

from bench.common import API_PREFIX, JWT_SECRET, STATUS_PREFIX, STREAM_PREFIX

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = os.environ.get("BENCH_JWT_SECRET", JWT_SECRET)

# BENCH_REDIS_CLUSTER=1 (`bench.run --cluster`): the same on a Redis Cluster, KEYS sent to
# every primary (redis-py merges the replies; by default it would ask one node only).
_CLUSTER = os.environ.get("BENCH_REDIS_CLUSTER") == "1"
_client_class = redis.RedisCluster if _CLUSTER else redis.Redis
redis_client = _client_class.from_url(REDIS_URL, decode_responses=True, socket_timeout=30)
_EVERY_PRIMARY: dict[str, Any] = {"target_nodes": redis.RedisCluster.PRIMARIES} if _CLUSTER else {}

app = FastAPI(title="in-backend active-session (baseline)")


async def get_current_user(authorization: str | None = Header(default=None)) -> dict[str, Any]:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise HTTPException(status_code=401, detail="Not authenticated")
    token = authorization.split(" ", 1)[1]
    try:
        claims: dict[str, Any] = jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp"]})
    except jwt.PyJWTError:
        raise HTTPException(status_code=401, detail="Invalid token") from None
    return claims


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get(API_PREFIX + "/conversations/{conversation_id}/active-session", response_model=None)
def get_active_session(
    conversation_id: str, user: Annotated[dict[str, Any], Depends(get_current_user)]
) -> dict[str, Any] | JSONResponse:
    not_found = JSONResponse(
        status_code=404,
        content={"error": "No active session found", "conversationId": conversation_id},
    )
    try:
        keys: list[str] = redis_client.keys(f"{STREAM_PREFIX}:{conversation_id}:*", **_EVERY_PRIMARY)  # type: ignore[assignment]
        if not keys:
            return not_found
        stream_key = keys[0]
        run_id = stream_key.split(":")[-1]  # the original's bug, kept on purpose
        last: list[tuple[str, dict[str, str]]] = redis_client.xrevrange(stream_key, count=1)  # type: ignore[assignment]
        status = redis_client.get(f"{STATUS_PREFIX}:{conversation_id}:{run_id}")
    except redis.RedisError:
        return not_found  # the original's behaviour: "Redis is down" looked like "no session"
    now = int(time.time() * 1000)
    cursor = last[0][0] if last else "0-0"
    active = status in ("pending", "running") or bool(last and last[0][1].get("type") != "end")
    return {
        "sessionId": run_id,
        "status": "active" if active else "completed",
        "cursor": cursor,
        "conversationId": conversation_id,
        "startedAt": now - 60_000,
        "lastActivity": now,
    }
