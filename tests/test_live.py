"""The live part of a body (streams/live.py), without I/O: what the hub pushes is written
from the waker's turn while the body's task sleeps; a send that has to wait, fails, or is
cancelled is the body's task's business, in order, and no one else's. The endpoints'
tests (test_resume.py, test_events.py) run the same code behind a real server and Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
from starlette.types import Message

from session_sidecar.streams import live
from session_sidecar.streams.listener import Closed, Listener, Reason
from session_sidecar.streams.waker import Waker
from session_sidecar.streams.wire import ZERO, Entry, decode_page

END = b"[end]"


def batch(*seqs: int, end: bool = False) -> list[Entry]:
    raw = [(f"{i}-0", {b"type": b"chunk", b"content": b"c"}) for i in seqs]
    if end:
        raw.append((f"{seqs[-1] + 1 if seqs else 1}-0", {b"type": b"end"}))
    return decode_page(raw)


def ids(entries: list[Entry]) -> bytes:
    return b"".join(END if e.type == "end" else f"[{e.id}]".encode() for e in entries)


class Recorder:
    """An ASGI `send` that keeps what it was given and whether a task was running it. It can
    hold a body until `gate` is set (as a server holds a send while a socket is full), or fail."""

    def __init__(self, hold: bytes = b"", fail: bytes = b"") -> None:
        self.hold, self.fail = hold, fail
        self.gate = asyncio.Event()
        self.bodies: list[bytes] = []
        self.in_task: list[bool] = []
        self.cancelled = False

    async def __call__(self, message: Message) -> None:
        body = message["body"]
        self.in_task.append(asyncio.current_task() is not None)
        if self.fail and body == self.fail:
            raise RuntimeError("send failed")
        if self.hold and body == self.hold:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        self.bodies.append(body)


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def following(listener: Listener, send: Recorder, keepalive_s: float | None = None) -> asyncio.Task[None]:
    return asyncio.create_task(live.follow(listener, send, ids, b"\n", keepalive_s))


async def followed(send: Recorder, waker: Waker | None = None) -> tuple[Listener, asyncio.Task[None]]:
    """A listener, and a body's task following it that now waits for entries."""
    listener = Listener("k", ZERO, 100, (waker or Waker()).soon)
    task = following(listener, send)
    await turns()
    return listener, task


async def pushed(listener: Listener, *batches: list[Entry]) -> None:
    """Each batch pushed, and the turns that deliver it let run."""
    for entries in batches:
        listener.push(entries)
        await turns()


async def test_entries_are_written_in_the_wakers_turn_while_the_task_sleeps() -> None:
    send = Recorder()
    listener, task = await followed(send)
    await pushed(listener, batch(1), batch(2), batch(3), batch(4, end=True))
    await asyncio.wait_for(task, 5)
    assert send.bodies == [b"[1-0]", b"[2-0]", b"[3-0]", b"[4-0]" + END]
    assert send.in_task == [False] * 4  # not one of them woke the body's task
    assert listener.sink is None and listener.after == (5, 0)


async def test_a_send_that_has_to_wait_is_finished_by_the_task_in_order() -> None:
    """The second write has to wait: what comes meanwhile is buffered and written by the
    task once it is done, as one piece; after that, writes come from the waker's turn again."""
    send = Recorder(hold=b"[2-0]")
    listener, task = await followed(send)
    await pushed(listener, batch(1), batch(2))
    listener.push(batch(3))
    listener.push(batch(4))
    await turns()
    assert send.bodies == [b"[1-0]"]
    send.gate.set()
    await turns()
    assert send.bodies == [b"[1-0]", b"[2-0]", b"[3-0][4-0]"]
    listener.push(batch(5, end=True))
    await asyncio.wait_for(task, 5)
    assert send.bodies == [b"[1-0]", b"[2-0]", b"[3-0][4-0]", b"[5-0]" + END]
    assert send.in_task == [False, False, True, False]


@pytest.mark.parametrize("when", ["waiting", "about to go on"])
async def test_a_cancelled_body_cancels_the_send_it_waits_on(when: str) -> None:
    """A client that leaves cancels the body's task: a send that was started in the waker's
    turn is cancelled with it, whether it still waits (the task's future is cancelled) or
    what it waited on just came (the cancellation is thrown in)."""
    send = Recorder(hold=b"[1-0]")
    listener, task = await followed(send)
    await pushed(listener, batch(1))
    if when == "about to go on":
        send.gate.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert send.cancelled and send.bodies == []
    assert listener.sink is None


async def test_a_send_that_fails_ends_that_body_alone() -> None:
    """The failure surfaces in the body's task, not in the waker's turn that wrote for
    every listener: the other listener of the same turn gets its entries all the same."""
    waker = Waker()
    failing_send, other_send = Recorder(fail=b"[1-0]"), Recorder()
    failing, failing_task = await followed(failing_send, waker)
    other, other_task = await followed(other_send, waker)
    entries = batch(1)
    failing.push(entries)
    other.push(entries)
    with pytest.raises(RuntimeError, match="send failed"):
        await asyncio.wait_for(failing_task, 5)
    other.push(batch(2, end=True))
    await asyncio.wait_for(other_task, 5)
    assert other_send.bodies == [b"[1-0]", b"[2-0]" + END]


async def test_a_close_comes_after_what_was_buffered() -> None:
    send = Recorder(hold=b"[1-0]")
    listener, task = await followed(send)
    await pushed(listener, batch(1))
    listener.push(batch(2))  # buffered behind the held send
    listener.close(Reason.GONE)
    send.gate.set()
    with pytest.raises(Closed) as closed:
        await asyncio.wait_for(task, 5)
    assert closed.value.reason is Reason.GONE
    assert send.bodies == [b"[1-0]", b"[2-0]"]


async def test_keepalives_come_after_silence_counted_from_the_last_write() -> None:
    listener = Listener("k", ZERO, 100, Waker().soon)
    send = Recorder()
    task = following(listener, send, keepalive_s=0.5)
    for i in range(1, 9):  # every 0.1 s: sooner than a keepalive is due
        await asyncio.sleep(0.1)
        listener.push(batch(i))
    await asyncio.sleep(0.05)
    assert b"\n" not in send.bodies
    await asyncio.sleep(0.75)
    assert send.bodies[8:] == [b"\n"]  # due 0.5 s after the last entry, and once only so far
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_follow_returns_at_its_deadline() -> None:
    listener = Listener("k", ZERO, 100, Waker().soon)
    send = Recorder()
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    await asyncio.wait_for(live.follow(listener, send, ids, b"\n", None, loop.time() + 0.3), 5)
    assert time.monotonic() - started >= 0.29
    assert send.bodies == [] and listener.sink is None
