"""A stand-in for the chat backend that writes runs exactly as it does (SPEC section 1).

The tests and the demo write all their data through this module, so what the
sidecar reads in tests is what production Redis holds. It writes only; the
sidecar itself never imports it outside the demo.

`at_ms` pins an entry id's time (`XADD key {ms}-*`) so tests can build runs
that happened in the past; without it Redis assigns the real time (`*`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import uuid
from collections.abc import Mapping

import redis.asyncio as aioredis

STREAM_MAXLEN = 1000
STREAM_TTL_S = 900  # REDIS_STREAM_TTL_SECS
STATUS_TTL_S = 600
CANCEL_TTL_S = 300
TASK_ID_TTL_S = 600


def _created_at(at_ms: int | None) -> str:
    """ISO-8601 UTC with no zone suffix, as the backend's `datetime.utcnow().isoformat()`."""
    when = dt.datetime.now(dt.UTC) if at_ms is None else dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC)
    return when.replace(tzinfo=None).isoformat()


class BackendSimulator:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        stream_prefix: str = "chat:stream",
        old_backend: bool = False,
    ):
        self.client = client
        self.stream_prefix = stream_prefix
        # Older backends never write `queued`/`cancelled` and say `pending` at dispatch.
        self.old_backend = old_backend

    # Spelled out here rather than taken from store.KeySchema: the simulator is the
    # backend's side of the contract, so a slip in the sidecar's schema shows in tests.
    def stream_key(self, conversation_id: str, run_id: str) -> str:
        return f"{self.stream_prefix}:{conversation_id}:{run_id}"

    def status_key(self, conversation_id: str, run_id: str) -> str:
        return f"task:status:{conversation_id}:{run_id}"

    async def new_run(self, conversation_id: str, user_id: str, message_id: str = "new") -> str:
        """The backend's run id: `conversation:{user}:{message}`, `-n` appended while taken."""
        base = f"conversation:{user_id}:{message_id}"
        run_id, n = base, 0
        while await self.client.exists(self.stream_key(conversation_id, run_id)):
            n += 1
            run_id = f"{base}-{n}"
        return run_id

    async def set_status(self, conversation_id: str, run_id: str, status: str) -> None:
        await self.client.set(self.status_key(conversation_id, run_id), status, ex=STATUS_TTL_S)

    async def xadd(
        self,
        conversation_id: str,
        run_id: str,
        event_type: str,
        fields: Mapping[str, str],
        at_ms: int | None = None,
    ) -> str:
        key = self.stream_key(conversation_id, run_id)
        entry = {
            "type": event_type,
            "conversation_id": conversation_id,
            "run_id": run_id,
            "created_at": _created_at(at_ms),
            **fields,
        }
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(
            key,
            entry,  # type: ignore[arg-type]
            id="*" if at_ms is None else f"{at_ms}-*",
            maxlen=STREAM_MAXLEN,
            approximate=True,
        )
        pipe.expire(key, STREAM_TTL_S)
        entry_id, _ = await pipe.execute()
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def queue(self, conversation_id: str, run_id: str, at_ms: int | None = None) -> None:
        """Dispatch. Newer backends publish `queued` first and record the worker task id."""
        if self.old_backend:
            await self.set_status(conversation_id, run_id, "pending")
            return
        await self.set_status(conversation_id, run_id, "queued")
        await self.client.set(f"task:id:{conversation_id}:{run_id}", str(uuid.uuid4()), ex=TASK_ID_TTL_S)
        await self.xadd(conversation_id, run_id, "queued", {"status": "queued", "message": "Queued"}, at_ms)

    async def start(
        self, conversation_id: str, run_id: str, at_ms: int | None = None, agent_id: str = "agent-1"
    ) -> None:
        await self.set_status(conversation_id, run_id, "running")
        await self.xadd(
            conversation_id,
            run_id,
            "start",
            {"agent_id": agent_id, "status": "processing", "message": "Agent started"},
            at_ms,
        )

    async def chunk(self, conversation_id: str, run_id: str, content: str, at_ms: int | None = None) -> str:
        fields = {"content": content, "citations_json": "[]", "tool_calls_json": "[]"}
        if not self.old_backend:
            fields["reasoning_json"] = json.dumps({"steps": []})
        return await self.xadd(conversation_id, run_id, "chunk", fields, at_ms)

    async def end(
        self, conversation_id: str, run_id: str, status: str = "completed", at_ms: int | None = None
    ) -> str:
        """`completed`, `error` or `cancelled`. Old backends leave `running` on cancel."""
        fields = {"status": status, "message": f"Run {status}"}
        if status == "completed":
            fields["usage_json"] = json.dumps({"input_tokens": 120, "output_tokens": 480})
        entry_id = await self.xadd(conversation_id, run_id, "end", fields, at_ms)
        if status == "cancelled" and self.old_backend:
            return entry_id
        await self.set_status(conversation_id, run_id, status)
        return entry_id

    async def cancel(self, conversation_id: str, run_id: str, at_ms: int | None = None) -> str:
        """The user pressed stop: the cancel flag, then the worker ends the run."""
        await self.client.set(f"cancel:{conversation_id}:{run_id}", "true", ex=CANCEL_TTL_S)
        return await self.end(conversation_id, run_id, "cancelled", at_ms)

    async def full_run(
        self,
        conversation_id: str,
        user_id: str,
        message_id: str = "new",
        *,
        chunks: int = 3,
        status: str | None = "completed",
        start_ms: int | None = None,
        step_ms: int = 200,
    ) -> str:
        """A whole run at pinned times from `start_ms`; `status=None` leaves it running."""
        run_id = await self.new_run(conversation_id, user_id, message_id)
        t = start_ms
        await self.queue(conversation_id, run_id, t)
        t = None if t is None else t + step_ms
        await self.start(conversation_id, run_id, t)
        for i in range(chunks):
            t = None if t is None else t + step_ms
            await self.chunk(conversation_id, run_id, f"token {i} ", t)
        if status is not None:
            t = None if t is None else t + step_ms
            if status == "cancelled":
                await self.cancel(conversation_id, run_id, t)
            else:
                await self.end(conversation_id, run_id, status, t)
        return run_id


def conversation_id() -> str:
    """A UUIDv7-shaped id, as the frontend uses."""
    ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    rand = uuid.uuid4().hex
    raw = f"{ms:012x}7{rand[:3]}{'89ab'[random.randrange(4)]}{rand[3:18]}"
    return str(uuid.UUID(raw))


async def live_run(
    sim: BackendSimulator,
    conversation: str,
    user_id: str,
    *,
    chunks: int,
    chunk_interval_s: float = 0.2,
    outcome: str = "completed",
    message_id: str | None = None,
) -> str:
    """One run in real time: queued, start, a chunk every ~200 ms, then its end."""
    run_id = await sim.new_run(conversation, user_id, message_id or uuid.uuid4().hex[:12])
    await sim.queue(conversation, run_id)
    await asyncio.sleep(random.uniform(0.2, 1.0))  # the Celery worker picks it up
    await sim.start(conversation, run_id)
    for i in range(chunks):
        await asyncio.sleep(chunk_interval_s)
        await sim.chunk(conversation, run_id, f"word{i} ")
    if outcome == "cancelled":
        await sim.cancel(conversation, run_id)
    elif outcome == "crashed":
        return run_id  # the worker died: no end, status left `running`
    else:
        await sim.end(conversation, run_id, outcome)
    return run_id
