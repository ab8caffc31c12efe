"""(a) The backend's resume route, `POST .../resume/{session_id}?cursor=`, rendered faithfully.

From the chat backend (github.com/potpie-ai/potpie, `legacy/app/modules/conversations/`,
the last commit before b5a6774 removed it): `conversations_router.resume_session`,
`utils/conversation_routing.redis_stream_generator` and
`utils/redis_streaming.RedisStreamManager.consume_stream`.

* FastAPI, one uvicorn worker. The route itself is `async def`: it checks the stream
  with `EXISTS` and reads the status key on an app-wide async client (a pool of 50),
  then returns a `StreamingResponse` over a *synchronous* generator;
* Starlette iterates a synchronous generator in anyio's thread pool (40 threads by
  default): every `next()` holds one of those threads until it returns, here until
  the next entry arrives or a 5 s block ends;
* the generator builds a new `RedisStreamManager`, whose `redis.from_url` is a pool of
  its own: one new Redis connection per client (socket timeout 30 s);
* `XRANGE key cursor +` (the whole replay in one reply), then a loop of `EXISTS` and
  `XREAD BLOCK 5000 COUNT 1` from the last id: one round trip per entry and client;
* each `chunk` (and `queued`) becomes `ChatMessageResponse(...)`, dumped by `json.dumps`;
  the body ends on `end`, or with nothing more when the key is gone.

Left out, which flatters this rendition: the access check through the database
(`get_conversation_info`), Firebase token verification (an HS256 check here, as in
the other bench apps), logging, and `.dict()` (pydantic 2's `model_dump()`, same output,
without the deprecation path).

Run: `uvicorn bench.resume_app:app --workers 1` with `BENCH_REDIS_URL` and `BENCH_JWT_SECRET`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Annotated, Any

import jwt
import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from bench.common import API_PREFIX, JWT_SECRET, STATUS_PREFIX, STREAM_PREFIX

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SECRET = os.environ.get("BENCH_JWT_SECRET", JWT_SECRET)

app = FastAPI(title="the backend's resume route (baseline)")
# AsyncRedisStreamManager(max_connections=50), app-scoped: the route's own checks.
async_redis = aioredis.Redis.from_url(REDIS_URL, max_connections=50)

Event = dict[str, Any]


class ChatMessageResponse(BaseModel):
    message: str
    citations: list[str]
    tool_calls: list[Any]
    thinking: str | None = None


async def get_current_user(authorization: str | None = Header(default=None)) -> dict[str, Any]:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise HTTPException(status_code=401, detail="Not authenticated")
    try:
        claims: dict[str, Any] = jwt.decode(
            authorization.split(" ", 1)[1], SECRET, algorithms=["HS256"], options={"require": ["exp"]}
        )
    except jwt.PyJWTError:
        raise HTTPException(status_code=401, detail="Invalid token") from None
    return claims


def _format_event(event_id: bytes, event_data: dict[bytes, bytes]) -> Event:
    formatted: Event = {"stream_id": event_id.decode()}
    for k, v in event_data.items():
        key, value = k.decode(), v.decode()
        if key.endswith("_json"):
            try:
                formatted[key.replace("_json", "")] = json.loads(value)
            except Exception:
                formatted[key.replace("_json", "")] = []
        else:
            formatted[key] = value
    return formatted


def consume_stream(client: redis.Redis, key: str, cursor: str) -> Iterator[Event]:
    """`consume_stream` with a cursor, which the route always has (its default is "0-0")."""
    try:
        events: Any = client.xrange(key, min=cursor, max="+")
        for event_id, event_data in events:
            yield _format_event(event_id, event_data)
        last_id = events[-1][0] if events else "0-0"
        while True:
            if not client.exists(key):
                yield {"type": "end", "status": "expired", "message": "Stream expired", "stream_id": last_id}
                return
            found: Any = client.xread({key: last_id}, block=5000, count=1)
            if not found:
                continue
            for _stream, stream_events in found:
                for event_id, event_data in stream_events:
                    last_id = event_id
                    event = _format_event(event_id, event_data)
                    yield event
                    if event.get("type") == "end":
                        return
    except Exception as e:
        yield {"type": "end", "status": "error", "message": f"Stream error: {e}", "stream_id": cursor}


def redis_stream_generator(conversation_id: str, run_id: str, cursor: str) -> Iterator[str]:
    # RedisStreamManager(): a client, and so a connection pool, of its own per request.
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=10, socket_timeout=30)
    key = f"{STREAM_PREFIX}:{conversation_id}:{run_id}"
    try:
        for event in consume_stream(client, key, cursor):
            if event.get("type") == "chunk":
                response = ChatMessageResponse(
                    message=event.get("content", ""),
                    citations=event.get("citations", []),
                    tool_calls=event.get("tool_calls", []),
                    thinking=event.get("thinking"),
                )
                yield json.dumps(response.model_dump(), default=str)
            elif event.get("type") == "queued":
                response = ChatMessageResponse(message="", citations=[], tool_calls=[], thinking=None)
                yield json.dumps(response.model_dump(), default=str)
            elif event.get("type") == "end":
                break
    except Exception:
        return  # "Don't yield error events to match original behavior"


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post(API_PREFIX + "/conversations/{conversation_id}/resume/{session_id}")
async def resume_session(
    conversation_id: str,
    session_id: str,
    user: Annotated[dict[str, Any], Depends(get_current_user)],
    cursor: str = Query("0-0"),
) -> StreamingResponse:
    if not await async_redis.exists(f"{STREAM_PREFIX}:{conversation_id}:{session_id}"):
        raise HTTPException(status_code=404, detail=f"Session {session_id} not found or expired")
    await async_redis.get(f"{STATUS_PREFIX}:{conversation_id}:{session_id}")  # logged by the original
    return StreamingResponse(
        redis_stream_generator(conversation_id, session_id, cursor), media_type="text/event-stream"
    )
