"""Replay a stream from the pool, then follow it through the hub, with no gap and no
duplicate at the hand-over (SPEC 8.1, 8.2, 8.4).

1. Replay: `XRANGE` pages from the normal pool until a short page; L = last id sent.
2. Subscribe to the hub at L. This is synchronous, so the stream's hub cursor C and
   the new listener are settled in one step: every entry the hub reads from now on
   (all of them after C) reaches the listener's buffer.
3. Tail: read `XRANGE` after L once more, paged. The hub may already have read past
   L for other listeners before step 2 (C > L), or entries may have arrived between
   the last page and step 2; all of them existed before the subscription, so this
   read returns them.
4. Live: the listener's buffer, minus what is at or before the last id sent (the
   tail and the buffer overlap; the overlap is dropped by id, never sent twice).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from session_sidecar.errors import Unavailable
from session_sidecar.store import within_budget
from session_sidecar.streams.hub import StreamHub
from session_sidecar.streams.listener import Closed, Reason
from session_sidecar.streams.wire import Entry, StreamId, decode_page, format_id, successor

PAGE = 200


async def read_page(hub: StreamHub, key: str, after: StreamId, timeout_s: float) -> list[Entry]:
    """Up to PAGE entries after `after`, from the pool, within the Redis budget."""
    raw = await within_budget(
        timeout_s, hub.client.xrange(key, min=format_id(successor(after)), max="+", count=PAGE)
    )
    return decode_page(raw)


def _through_end(batch: list[Entry]) -> tuple[list[Entry], bool]:
    for i, entry in enumerate(batch):
        if entry.type == "end":
            return batch[: i + 1], True
    return batch, False


async def follow(
    hub: StreamHub,
    key: str,
    after: StreamId,
    first_page: list[Entry],
    *,
    timeout_s: float,
    idle: Callable[[], float | None],
    alive_key: str | None = None,
) -> AsyncGenerator[list[Entry], None]:
    """Batches of the entries after `after`, replayed then live, in order, each once;
    `[]` when `idle()` seconds passed without one. Stops after an `end` entry; raises
    `Closed` when the hub closes the listener or Redis fails (`Reason.ERROR`).

    `first_page` is the replay's first page, read before the response started.
    """
    page = first_page
    del first_page  # held for the life of the stream otherwise: up to PAGE entries per client
    try:
        while True:
            if page:
                page, ended = _through_end(page)
                yield page
                if ended:
                    return
                after = page[-1].sid
            if len(page) < PAGE:
                break
            page = await read_page(hub, key, after, timeout_s)
        listener = hub.subscribe(key, after, alive_key)
        try:
            while True:
                page = await read_page(hub, key, after, timeout_s)
                if page:
                    page, ended = _through_end(page)
                    yield page
                    if ended:
                        return
                    after = listener.after = page[-1].sid
                if len(page) < PAGE:
                    break
            del page  # sent: not kept for the life of the stream
            while True:
                batch, ended = _through_end(await listener.next(idle()))
                yield batch
                if ended:
                    return
        finally:
            hub.unsubscribe(listener)
    except Unavailable:
        raise Closed(Reason.ERROR) from None
