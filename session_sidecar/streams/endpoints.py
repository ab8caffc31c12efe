"""The two streamed endpoints: the backend's resume route, byte-compatible (SPEC 8.1), and
Server-Sent Events (8.2). Refusals found before the first byte are the usual flat JSON
answers of `routes.py`; what happens after it is told in the body itself."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

from redis.exceptions import ResponseError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from session_sidecar.errors import ApiError, BadRequest, NotFound
from session_sidecar.problems import warn_once
from session_sidecar.routes import NO_STORE, _refusal, identify
from session_sidecar.settings import Settings
from session_sidecar.store.client import execute, redis_timeout_s, within_budget
from session_sidecar.streams import live
from session_sidecar.streams.follow import PAGE, Follower
from session_sidecar.streams.hub import StreamHub
from session_sidecar.streams.listener import Closed, Reason
from session_sidecar.streams.response import STREAM_HEADERS, Streamed, more
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

SESSION_NOT_FOUND = "Session not found"
# How long a resume body outlives a Redis failure: a restart or a failover takes seconds
# (Sentinel's default down-after is 30 s), so a body survives those, and ends only when
# Redis stays down longer. Attempts start RETRY_PAUSE_S apart, then twice as far each time.
RESUME_RETRY_S = 45.0
RETRY_PAUSE_S = 0.1
RETRY_PAUSE_MAX_S = 2.0


async def resume(request: Request) -> Response:
    """POST .../resume/{session_id}?cursor=: every entry from `cursor` on, then live ones."""
    sidecar = request.app.state.sidecar
    hub: StreamHub = sidecar.hub
    conversation_id: str = request.path_params["conversation_id"]
    run_id: str = request.path_params["session_id"]
    timeout_s = redis_timeout_s(sidecar.settings)
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
    body = functools.partial(
        _resume_body,
        hub=hub,
        key=key,
        after=after,
        first_page=first_page,
        timeout_s=timeout_s,
        keepalive_s=keepalive_s or None,
    )
    return Streamed(body, hub)


async def _resume_body(
    send: Send,
    hub: StreamHub,
    key: str,
    after: StreamId,
    first_page: list[Entry],
    timeout_s: float,
    keepalive_s: float | None,
) -> None:
    """The body; on a Redis failure it stays open (keepalives meanwhile) and follows again
    from the last entry sent, for up to RESUME_RETRY_S: the frontend takes the end of the
    body for a finished answer, so only a Redis that stays down ends it (8.1)."""
    loop = asyncio.get_running_loop()
    written = loop.time()
    failing_since: float | None = None
    pause_s = RETRY_PAUSE_S
    while True:
        follower = Follower(hub, key, after, first_page, timeout_s=timeout_s, check=failing_since is not None)
        first_page = []
        try:
            if await _send_pages(follower, send, _resume_chunk):
                written = loop.time()
            failing_since, pause_s = None, RETRY_PAUSE_S  # Redis answers again
            if follower.ended:
                return  # the run's `end`
            await live.follow(follower.listener, send, _resume_chunk, RESUME_KEEPALIVE, keepalive_s)
            return  # the run's `end`
        except Closed as closed:
            if closed.reason is not Reason.ERROR:
                return  # the key went, the client fell behind, shutdown: the body ends
        finally:
            after = follower.after
            follower.close()
        if failing_since is None:
            failing_since = loop.time()
        if loop.time() - failing_since >= RESUME_RETRY_S:
            return  # Redis stayed down: the body ends
        resume_at = loop.time() + pause_s
        pause_s = min(pause_s * 2, RETRY_PAUSE_MAX_S)
        while (left := resume_at - loop.time()) > 0:
            due = math.inf if keepalive_s is None else written + keepalive_s - loop.time()
            if due <= 0:
                await send(more(RESUME_KEEPALIVE))
                written = loop.time()
            else:
                await asyncio.sleep(min(left, due))


async def _send_pages(follower: Follower, send: Send, encode: Callable[[list[Entry]], bytes]) -> bool:
    """The replay and the tail (`Follower.catch_up`), sent; whether anything was. A function
    of its own so that no page outlives its sending: the last one would otherwise stay
    referenced from the body for the life of the stream, up to PAGE entries per client."""
    wrote = False
    async with contextlib.aclosing(follower.catch_up()) as pages:
        async for page in pages:
            if chunk := encode(page):
                await send(more(chunk))
                wrote = True
    return wrote


def _resume_chunk(batch: list[Entry]) -> bytes:
    """One piece of the body per batch, so one write: most often a single entry's bytes."""
    if len(batch) == 1:
        return batch[0].resume_bytes
    return b"".join(entry.resume_bytes for entry in batch)


async def events(request: Request) -> Response:
    """GET .../events?run_id=&cursor=: Server-Sent Events, resumable with Last-Event-ID."""
    sidecar = request.app.state.sidecar
    hub: StreamHub = sidecar.hub
    settings = sidecar.settings
    schema = sidecar.sessions.schema
    conversation_id: str = request.path_params["conversation_id"]
    timeout_s = redis_timeout_s(settings)
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
    body = functools.partial(
        _events_body,
        hub=hub,
        key=key,
        start=start,
        alive_key=alive_key,
        settings=settings,
        timeout_s=timeout_s,
    )
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
    send: Send,
    hub: StreamHub,
    key: str,
    start: EventsStart,
    alive_key: str | None,
    settings: Settings,
    timeout_s: float,
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.sse_max_s
    keepalive_s: float = settings.sse_keepalive_s
    gap = start.gap
    await send(more(RETRY if gap is None else RETRY + sse_event("gap", {"firstAvailable": gap})))
    follower = Follower(hub, key, start.after, start.first_page, timeout_s=timeout_s, alive_key=alive_key)
    del start  # its first page is the follower's now, not to be kept for the life of the stream
    try:
        await _send_pages(follower, send, _events_chunk)
        if follower.ended:
            return
        # Returns at the run's `end`, or at the deadline without one: the client then
        # reconnects with Last-Event-ID.
        keepalive_after = keepalive_s if keepalive_s > 0 else None
        await live.follow(follower.listener, send, _events_chunk, KEEPALIVE, keepalive_after, deadline)
    except Closed as closed:
        if closed.reason is Reason.GONE:
            await send(more(sse_event("end", {"status": "expired"})))
        elif closed.reason is Reason.ERROR:
            await send(more(sse_event("error", {"error": "Session store unavailable"})))
        # overflow, shutdown: no `end`, so the client resumes from its last id
    finally:
        follower.close()


def _events_chunk(batch: list[Entry]) -> bytes:
    if len(batch) == 1:
        return batch[0].sse_bytes
    return b"".join(entry.sse_bytes for entry in batch)
