"""The two streamed endpoints: the backend's resume route, byte-compatible (SPEC 8.1), and
Server-Sent Events (8.2). Refusals found before the first byte are the usual flat JSON
answers of `routes.py`; what happens after it is told in the body itself."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple

from redis.exceptions import ResponseError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from session_sidecar.errors import ApiError, BadRequest, NotFound
from session_sidecar.problems import warn_once
from session_sidecar.routes import NO_STORE, _refusal, identify
from session_sidecar.settings import Settings
from session_sidecar.store import execute, within_budget
from session_sidecar.streams.follow import PAGE, follow
from session_sidecar.streams.hub import StreamHub
from session_sidecar.streams.listener import Closed, Reason
from session_sidecar.streams.wire import (
    KEEPALIVE,
    RESUME_KEEPALIVE,
    RETRY,
    ZERO,
    Entry,
    StreamId,
    before,
    decode_entry,
    decode_page,
    format_id,
    parse_id,
    sse_event,
    successor,
)

STREAM_HEADERS = {**NO_STORE, "X-Accel-Buffering": "no"}
SESSION_NOT_FOUND = "Session not found"
# How long a resume body outlives a Redis failure: a restart or a failover takes seconds
# (Sentinel's default down-after is 30 s), so a body survives those, and ends only when
# Redis stays down longer. Attempts start RETRY_PAUSE_S apart, then twice as far each time.
RESUME_RETRY_S = 45.0
RETRY_PAUSE_S = 0.1
RETRY_PAUSE_MAX_S = 2.0


class Streamed(Response):
    """A streamed answer that gives its place back however it ends, and ends its body
    properly at shutdown.

    Leaner than Starlette's `StreamingResponse`, whose anyio task group costs memory per
    client: the body is written from the request's own task, and one small task waits
    for the client to leave (uvicorn's `send` then returns silently instead of failing,
    so without it an idle stream would outlive its client until its next keepalive)."""

    def __init__(self, body: AsyncGenerator[bytes, None], hub: StreamHub):
        self.status_code = 200
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers(STREAM_HEADERS)  # no `body` attribute: no Content-Length
        self._body = body
        self._hub = hub
        self._left = False  # the client disconnected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.create_task(self._watch(receive, task))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with contextlib.aclosing(self._body):
                async for chunk in self._body:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watcher.cancel()  # before the end: uvicorn answers `receive` with a disconnect then
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if self._left:
                task.uncancel()  # our own cancellation, done with: nothing to send to anyone
                return
            # uvicorn cancels the requests still running SIDECAR_SHUTDOWN_TIMEOUT_S after a
            # stop began, then cuts their connections mid-body. The body is ended properly
            # instead (8.1: the response ends at shutdown). Not re-raised: nothing awaits
            # this request any more, and uvicorn would log a traceback per open stream.
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self._hub.release()

    async def _watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass  # the request's own body, unread
        self._left = True
        task.cancel()


async def resume(request: Request) -> Response:
    """POST .../resume/{session_id}?cursor=: every entry from `cursor` on, then live ones."""
    sidecar = request.app.state.sidecar
    hub: StreamHub = sidecar.hub
    conversation_id: str = request.path_params["conversation_id"]
    run_id: str = request.path_params["session_id"]
    timeout_s = sidecar.settings.redis_timeout_ms / 1000
    try:
        identity = await identify(request, conversation_id)
        cursor = parse_id(request.query_params.get("cursor", "0-0"))
        if cursor is None:
            raise BadRequest("Malformed cursor")
        visible = await sidecar.policy.visible_runs(identity, conversation_id)
        if not sidecar.sessions.schema.may_hold_runs(conversation_id) or not visible(run_id):
            raise NotFound(SESSION_NOT_FOUND)  # hidden answers exactly as missing
        key = sidecar.sessions.schema.stream_key(conversation_id, run_id)
        after = before(cursor)  # inclusive, as the backend's XRANGE min=cursor
        kind, first_page, last = await within_budget(timeout_s, _read_resume_start(hub, key, after))
        if kind != b"stream":
            raise NotFound(SESSION_NOT_FOUND)
        if last is not None and last.type == "end" and last.sid <= after:
            # The run ended before `cursor`: nothing will ever follow, so nothing to wait for.
            return Response(headers=STREAM_HEADERS, media_type="text/event-stream")
        hub.admit()
    except ApiError as refusal:
        return _refusal(request, refusal, conversation_id)
    keepalive_s = sidecar.settings.resume_keepalive_s
    body = _resume_body(hub, key, after, first_page, timeout_s, keepalive_s or None)
    return Streamed(body, hub)


async def _resume_body(
    hub: StreamHub,
    key: str,
    after: StreamId,
    first_page: list[Entry],
    timeout_s: float,
    keepalive_s: float | None,
) -> AsyncGenerator[bytes, None]:
    """The body; on a Redis failure it stays open (keepalives meanwhile) and follows again
    from the last entry sent, for up to RESUME_RETRY_S: the frontend takes the end of the
    body for a finished answer, so only a Redis that stays down ends it (8.1)."""
    loop = asyncio.get_running_loop()
    written = loop.time()
    failing_since: float | None = None
    pause_s = RETRY_PAUSE_S
    while True:
        entries = follow(hub, key, after, first_page, timeout_s=timeout_s, idle=lambda: keepalive_s)
        first_page = []
        try:
            async with contextlib.aclosing(entries):
                async for batch in entries:
                    failing_since, pause_s = None, RETRY_PAUSE_S  # Redis answers again
                    if not batch:
                        yield RESUME_KEEPALIVE
                        written = loop.time()
                        continue
                    after = batch[-1].sid
                    chunk = b"".join(entry.resume_bytes for entry in batch)
                    if chunk:
                        yield chunk
                        written = loop.time()
            return  # the run's `end`
        except Closed as closed:
            if closed.reason is not Reason.ERROR:
                return  # the key went, the client fell behind, shutdown: the body ends
        if failing_since is None:
            failing_since = loop.time()
        if loop.time() - failing_since >= RESUME_RETRY_S:
            return  # Redis stayed down: the body ends
        resume_at = loop.time() + pause_s
        pause_s = min(pause_s * 2, RETRY_PAUSE_MAX_S)
        while (left := resume_at - loop.time()) > 0:
            due = math.inf if keepalive_s is None else written + keepalive_s - loop.time()
            if due <= 0:
                yield RESUME_KEEPALIVE
                written = loop.time()
            else:
                await asyncio.sleep(min(left, due))


async def events(request: Request) -> Response:
    """GET .../events?run_id=&cursor=: Server-Sent Events, resumable with Last-Event-ID."""
    sidecar = request.app.state.sidecar
    hub: StreamHub = sidecar.hub
    settings = sidecar.settings
    schema = sidecar.sessions.schema
    conversation_id: str = request.path_params["conversation_id"]
    timeout_s = settings.redis_timeout_ms / 1000
    try:
        identity = await identify(request, conversation_id)
        position = _position(request)
        visible = await sidecar.policy.visible_runs(identity, conversation_id)
        run_id = request.query_params.get("run_id")
        if not run_id:
            found = await sidecar.sessions.lookup(conversation_id, visible)
            if found is None:
                raise NotFound("No active session found")
            run_id = found.run.run_id
        elif not schema.may_hold_runs(conversation_id) or not visible(run_id):
            raise NotFound(SESSION_NOT_FOUND)
        key = schema.stream_key(conversation_id, run_id)
        status_key = schema.status_key(conversation_id, run_id)
        start = await within_budget(timeout_s, _read_events_start(hub, key, status_key, position))
        if start is None:
            raise NotFound(SESSION_NOT_FOUND)
        if start.finished:
            # The client already has the `end`: 204 tells an EventSource to stop reconnecting.
            return Response(status_code=204, headers=NO_STORE)
        hub.admit()
    except ApiError as refusal:
        return _refusal(request, refusal, conversation_id)
    alive_key = status_key if start.waiting else None
    body = _events_body(hub, key, start, alive_key, settings, timeout_s)
    return Streamed(body, hub)


def _position(request: Request) -> StreamId | None:
    """Last-Event-ID, else `cursor`, else the beginning; None for `$` (what exists now)."""
    text = request.headers.get("last-event-id") or request.query_params.get("cursor")
    if text is None:
        return ZERO
    if text == "$":
        return None
    sid = parse_id(text)
    if sid is None:
        raise BadRequest("Malformed cursor")
    return sid


async def _read_resume_start(
    hub: StreamHub, key: str, after: StreamId
) -> tuple[bytes, list[Entry], Entry | None]:
    """One round trip: the key's type, the first replay page, the last entry."""
    pipe = hub.client.pipeline(transaction=False)
    pipe.type(key)
    pipe.xrange(key, min=format_id(successor(after)), max="+", count=PAGE)
    pipe.xrevrange(key, max="+", min="-", count=1)
    kind, page, last = await execute(pipe)
    if kind != b"stream":
        if kind != b"none":
            warn_once(("not-a-stream", key), "key %r is a %r, not a stream: not found", key, kind)
        return kind, [], None
    last_entries = decode_page(last)
    return kind, decode_page(page), (last_entries[0] if last_entries else None)


class EventsStart(NamedTuple):
    after: StreamId
    first_page: list[Entry]
    gap: str | None  # the first retained id, when entries after the position were trimmed
    finished: bool  # the client has the `end` already
    waiting: bool  # a queued run: a status key, no stream yet


async def _read_events_start(
    hub: StreamHub, key: str, status_key: str, position: StreamId | None
) -> EventsStart | None:
    """One round trip; None when the run has neither a stream nor a status key."""
    pipe = hub.client.pipeline(transaction=False)
    pipe.exists(status_key)
    pipe.xinfo_stream(key)
    if position is not None:
        pipe.xrange(key, min=format_id(successor(position)), max="+", count=PAGE)
    has_status, info, *page = await execute(pipe)
    if isinstance(info, ResponseError):
        if "WRONGTYPE" in str(info):
            warn_once(("not-a-stream", key), "key %r is not a stream: not found", key)
        elif has_status:
            return EventsStart(position or ZERO, [], None, False, waiting=True)
        return None
    if position is None:  # `$`: only what comes after the last id at this moment
        return EventsStart(parse_id(info["last-generated-id"].decode()) or ZERO, [], None, False, False)
    first_page = decode_page(page[0])
    first, last = info.get("first-entry"), info.get("last-entry")
    gap = None
    added = info.get("entries-added")  # Redis 7+; without it a trimmed gap cannot be told
    if first and added is not None and added > info["length"]:
        first_entry = decode_entry(*first)
        if position < first_entry.sid:
            gap = first_entry.id
    last_entry = decode_entry(*last) if last else None
    finished = last_entry is not None and last_entry.type == "end" and last_entry.sid <= position
    return EventsStart(position, first_page, gap, finished, False)


async def _events_body(
    hub: StreamHub,
    key: str,
    start: EventsStart,
    alive_key: str | None,
    settings: Settings,
    timeout_s: float,
) -> AsyncGenerator[bytes, None]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.sse_max_s
    keepalive_s: float = settings.sse_keepalive_s

    def idle() -> float:
        left: float = max(deadline - loop.time(), 0.0)
        return min(keepalive_s, left) if keepalive_s > 0 else left

    gap = start.gap
    yield RETRY if gap is None else RETRY + sse_event("gap", {"firstAvailable": gap})
    entries = follow(
        hub, key, start.after, start.first_page, timeout_s=timeout_s, idle=idle, alive_key=alive_key
    )
    del start  # its first page is `follow`'s now, not to be kept for the life of the stream
    try:
        async with contextlib.aclosing(entries):
            async for batch in entries:
                if batch:
                    yield b"".join(entry.sse_bytes for entry in batch)
                elif loop.time() < deadline:
                    yield KEEPALIVE
                if loop.time() >= deadline:
                    return  # no `end`: the client reconnects with Last-Event-ID
    except Closed as closed:
        if closed.reason is Reason.GONE:
            yield sse_event("end", {"status": "expired"})
        elif closed.reason is Reason.ERROR:
            yield sse_event("error", {"error": "Session store unavailable"})
        # overflow, shutdown: no `end`, so the client resumes from its last id
