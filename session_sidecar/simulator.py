"""A stand-in for the chat backend that writes runs exactly as it does (SPEC section 1).

The tests and the demo write all their data through this module, so what the
sidecar reads in tests is what production Redis holds. It writes only; the
sidecar itself never imports it outside the demo.

`at_ms` pins an entry id's time (`XADD key {ms}-*`) so tests can build runs
that happened in the past; without it Redis assigns the real time (`*`).

Two backend generations are modelled (`old_backend`): the older one has no
`queued` event, no task id, no run-id reservation, no `thinking`, and its
cancelled runs keep `running`; the newer one stops a run by deleting it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import time
import uuid
from collections.abc import Mapping
from typing import Literal

import redis.asyncio as aioredis

STREAM_MAXLEN = 1000
STREAM_TTL_S = 900  # REDIS_STREAM_TTL_SECS
STATUS_TTL_S = 600
CANCEL_TTL_S = 300
TASK_ID_TTL_S = 600
RESERVATION_TTL_S = 120
# The backend's stop waits this long between its `end` entry and deleting the run,
# so a client blocked on XREAD receives the `end` before the stream vanishes.
STOP_DELETE_DELAY_S = 0.2
# What the web frontend sends as the user part of the run ids it names itself.
FRONTEND_USER = "current_user_id"

_END_MESSAGES = {"completed": "Agent execution completed", "cancelled": "Generation cancelled by user"}

Naming = Literal["frontend", "regenerate", "message"]
Outcome = Literal["completed", "error", "cancelled", "stopped", "crashed"]


def _created_at(at_ms: int | None) -> str:
    """ISO-8601 UTC with no zone suffix, as the backend's `datetime.utcnow().isoformat()`."""
    when = dt.datetime.now(dt.UTC) if at_ms is None else dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC)
    return when.replace(tzinfo=None).isoformat()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
        self.old_backend = old_backend

    # Spelled out here rather than taken from store.keys.KeySchema: the simulator is the
    # backend's side of the contract, so a slip in the sidecar's schema shows in tests.
    def stream_key(self, conversation_id: str, run_id: str) -> str:
        return f"{self.stream_prefix}:{conversation_id}:{run_id}"

    def status_key(self, conversation_id: str, run_id: str) -> str:
        return f"task:status:{conversation_id}:{run_id}"

    def cancel_key(self, conversation_id: str, run_id: str) -> str:
        return f"cancel:{conversation_id}:{run_id}"

    def task_id_key(self, conversation_id: str, run_id: str) -> str:
        return f"task:id:{conversation_id}:{run_id}"

    def reservation_key(self, conversation_id: str, run_id: str) -> str:
        return f"{self.stream_prefix}:reservation:{conversation_id}:{run_id}"

    async def new_run(self, conversation_id: str, user_id: str, message_id: str = "new") -> str:
        """The backend's own run id, `conversation:{user}:{message or "new"}` (regenerate,
        API clients), made unique by `claim_run_id`."""
        return await self.claim_run_id(conversation_id, f"conversation:{user_id}:{message_id}")

    async def new_frontend_run(self, conversation_id: str, at_ms: int | None = None) -> str:
        """A run the web frontend names: `conversation:current_user_id:{unix ms}`, literally."""
        ms = _now_ms() if at_ms is None else at_ms
        return await self.claim_run_id(conversation_id, f"conversation:{FRONTEND_USER}:{ms}")

    async def claim_run_id(self, conversation_id: str, requested: str) -> str:
        """`requested`, or `requested-{n}` (n = 1, 2, ...) while that id is taken."""
        run_id, n = requested, 0
        while not await self._claim(conversation_id, run_id):
            n += 1
            run_id = f"{requested}-{n}"
        return run_id

    async def _claim(self, conversation_id: str, run_id: str) -> bool:
        """Newer backends reserve the id (`SET NX EX 120`) before its first event; older
        ones only ask whether its stream exists."""
        stream = self.stream_key(conversation_id, run_id)
        if self.old_backend:
            return not await self.client.exists(stream)
        reservation = self.reservation_key(conversation_id, run_id)
        if not await self.client.set(reservation, str(uuid.uuid4()), nx=True, ex=RESERVATION_TTL_S):
            return False
        if await self.client.exists(stream):  # the stream outlived its reservation
            await self.client.delete(reservation)
            return False
        return True

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
        """Dispatch. Newer backends publish `queued`, then record the worker task id."""
        if self.old_backend:
            await self.set_status(conversation_id, run_id, "pending")
            return
        await self.set_status(conversation_id, run_id, "queued")
        await self.xadd(
            conversation_id,
            run_id,
            "queued",
            {"status": "queued", "message": "Task queued for processing"},
            at_ms,
        )
        await self.client.set(self.task_id_key(conversation_id, run_id), str(uuid.uuid4()), ex=TASK_ID_TTL_S)

    async def start(
        self, conversation_id: str, run_id: str, at_ms: int | None = None, agent_id: str = "agent-1"
    ) -> None:
        await self.set_status(conversation_id, run_id, "running")
        await self.xadd(
            conversation_id,
            run_id,
            "start",
            {"agent_id": agent_id, "status": "processing", "message": "Starting message processing"},
            at_ms,
        )

    async def chunk(
        self,
        conversation_id: str,
        run_id: str,
        content: str,
        at_ms: int | None = None,
        *,
        thinking: str | None = None,
    ) -> str:
        """`thinking` (a plain field) is what newer backends add while the model reasons."""
        fields = {"content": content, "citations_json": "[]", "tool_calls_json": "[]"}
        if thinking is not None:
            fields["thinking"] = thinking
        if not self.old_backend:
            fields["reasoning_json"] = json.dumps({"steps": []})
        return await self.xadd(conversation_id, run_id, "chunk", fields, at_ms)

    async def end(
        self, conversation_id: str, run_id: str, status: str = "completed", at_ms: int | None = None
    ) -> str:
        """`completed`, `error` or `cancelled`, in the worker's order of writes.

        A failure sets the status before its `end` entry; the other outcomes write
        the entry first. Old backends leave `running` on cancel.
        """
        if status == "error":
            await self.set_status(conversation_id, run_id, status)
            return await self.xadd(
                conversation_id,
                run_id,
                "end",
                {"status": status, "message": "An internal error occurred."},
                at_ms,
            )
        fields = {"status": status, "message": _END_MESSAGES.get(status, f"Run {status}")}
        if status == "completed":
            usage = {
                "model": "demo-model",
                "prompt_tokens": 120,
                "completion_tokens": 480,
                "total_tokens": 600,
            }
            fields["usage_json"] = json.dumps([usage])
        entry_id = await self.xadd(conversation_id, run_id, "end", fields, at_ms)
        if status == "cancelled" and self.old_backend:
            return entry_id
        await self.set_status(conversation_id, run_id, status)
        return entry_id

    async def cancel(self, conversation_id: str, run_id: str, at_ms: int | None = None) -> str:
        """The user pressed stop and the worker ended the run: the cancel flag, then its end.

        On a newer backend this is the state of the ~0.2 s before `stop` deletes
        the run; on an old backend it is final (status left `running`).
        """
        await self.client.set(self.cancel_key(conversation_id, run_id), "true", ex=CANCEL_TTL_S)
        return await self.end(conversation_id, run_id, "cancelled", at_ms)

    async def stop(self, conversation_id: str, run_id: str, at_ms: int | None = None) -> str:
        """The backend's stop route: on newer backends the run then disappears from Redis.

        Cancel flag, `end` entry `cancelled`, status `cancelled`, ~0.2 s, then one
        DEL of the stream, cancel, task id and status keys (the reservation is left
        to expire). On old backends a stop is `cancel`: status left `running`, nothing deleted.
        """
        if self.old_backend:
            return await self.cancel(conversation_id, run_id, at_ms)
        await self.client.set(self.cancel_key(conversation_id, run_id), "true", ex=CANCEL_TTL_S)
        entry_id = await self.xadd(
            conversation_id,
            run_id,
            "end",
            {"status": "cancelled", "message": "Generation stopped by user"},
            at_ms,
        )
        await self.set_status(conversation_id, run_id, "cancelled")
        await asyncio.sleep(STOP_DELETE_DELAY_S)
        await self.client.delete(
            self.stream_key(conversation_id, run_id),
            self.cancel_key(conversation_id, run_id),
            self.task_id_key(conversation_id, run_id),
            self.status_key(conversation_id, run_id),
        )
        return entry_id

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
        """A whole run at pinned times from `start_ms`; `status=None` leaves it running,
        `status="stopped"` stops it (`stop`). `user_id=FRONTEND_USER` with a ms
        `message_id` gives the id the web frontend would have sent."""
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
            elif status == "stopped":
                await self.stop(conversation_id, run_id, t)
            else:
                await self.end(conversation_id, run_id, status, t)
        return run_id


def conversation_id() -> str:
    """A UUIDv7-shaped id, as the frontend uses."""
    ms = _now_ms()
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
    outcome: Outcome = "completed",
    message_id: str | None = None,
    naming: Naming = "message",
    pickup_s: tuple[float, float] = (0.2, 1.0),
) -> str:
    """One run in real time: queued, start, a chunk every ~200 ms, then its end.

    `naming`: `frontend` (the web app's own id), `regenerate` (`...:{user}:new`)
    or `message` (`...:{user}:{message_id}`, random when None). Newer backends
    think aloud in the first chunks. `crashed`: the worker dies, no end.
    """
    if naming == "frontend":
        run_id = await sim.new_frontend_run(conversation)
    else:
        message = "new" if naming == "regenerate" else message_id or uuid.uuid4().hex[:12]
        run_id = await sim.new_run(conversation, user_id, message)
    await sim.queue(conversation, run_id)
    await asyncio.sleep(random.uniform(*pickup_s))  # the Celery worker picks it up
    await sim.start(conversation, run_id)
    for i in range(chunks):
        await asyncio.sleep(chunk_interval_s)
        thinking = None if sim.old_backend or i >= 2 else f"Considering step {i + 1}..."
        await sim.chunk(conversation, run_id, f"word{i} ", thinking=thinking)
    if outcome == "cancelled":
        await sim.cancel(conversation, run_id)
    elif outcome == "stopped":
        await sim.stop(conversation, run_id)
    elif outcome != "crashed":  # crashed: the worker died, status left `running`
        await sim.end(conversation, run_id, outcome)
    return run_id
