"""Steady polling of both endpoints while the Redis topology changes under the sidecar,
every answer kept, so a test can say: never a 404, never a wrong run, and when the
answers were right again. Plus a writer that keeps a run live the way the backend does."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Self

import httpx

from session_sidecar.simulator import BackendSimulator
from tests.conftest import auth
from tests.streaming import Served, http_client, open_events, sse_events
from tests.topology import until

ENDPOINTS = ("active-session", "task-status")
WATCHED = "task-status?wait"  # a held request of the watch (docs/watch.md), recorded as an endpoint
POLL_S = 0.02  # between two rounds of both endpoints
WRITE_S = 0.1  # between two chunks of the live run
HOLD_S = 1  # how long a watch request is held when nothing changes


@dataclass
class Answer:
    sent: float  # monotonic
    received: float
    endpoint: str
    status: int  # 0: no HTTP answer at all
    body: dict[str, Any]
    etag: str = ""

    def names(self, run_id: str) -> bool:
        if self.endpoint == "active-session":
            return self.body.get("sessionId") == run_id and self.body.get("status") == "active"
        return self.body.get("sessionId") == run_id and self.body.get("isActive") is True


@dataclass
class Poller:
    """Asks both endpoints about `conversation` in turn; `expected` is its working run."""

    served: Served
    conversation: str
    expected: str
    answers: list[Answer] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Poller:
        """Both endpoints in turn, and beside them one watch request held after another."""
        self._tasks = [asyncio.create_task(self._poll()), asyncio.create_task(self._watch())]
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _ask(self, http: httpx.AsyncClient, endpoint: str, params: dict[str, Any]) -> Answer:
        sent = time.monotonic()
        path = self.served.path(self.conversation, endpoint.partition("?")[0])
        try:
            response = await http.get(path, headers=auth("alice"), params=params)
            status, body = response.status_code, response.json()
            etag = response.headers.get("etag", "")
        except httpx.HTTPError as exc:
            status, body, etag = 0, {"error": repr(exc)}, ""
        answer = Answer(sent, time.monotonic(), endpoint, status, body, etag)
        self.answers.append(answer)
        return answer

    async def _poll(self) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                for endpoint in ENDPOINTS:
                    await self._ask(http, endpoint, {})
                await asyncio.sleep(POLL_S)

    async def _watch(self) -> None:
        since = ""
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                answer = await self._ask(http, WATCHED, {"wait": HOLD_S, "since": since} if since else {})
                since = answer.etag
                if answer.status != 200:
                    await asyncio.sleep(POLL_S)

    def right(self, answer: Answer) -> bool:
        return answer.status == 200 and answer.names(self.expected)

    def wrong(self) -> list[Answer]:
        """Every answer that is neither right nor a 503: a 404, another run, no answer."""
        return [a for a in self.answers if not self.right(a) and a.status != 503]

    def unavailable(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 503]

    def steady_since(self, since: float) -> float | None:
        """When answers became right for good after `since`: the first right answer after the
        last one that was not (`since` itself if all were right), or None if none was."""
        after = [a for a in self.answers if a.sent >= since]
        last_bad = max((a.received for a in after if not self.right(a)), default=None)
        if last_bad is None:
            return since if after else None
        return min((a.sent for a in after if a.sent > last_bad and self.right(a)), default=None)

    async def until_steady(self, since: float, hold_s: float = 2.0, timeout_s: float = 40) -> float:
        """Seconds from `since` until answers were right again, once they stayed right `hold_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            steady = self.steady_since(since)
            if steady is not None and time.monotonic() - steady >= hold_s:
                return steady - since
            await asyncio.sleep(0.1)
        raise AssertionError(f"answers not right again within {timeout_s:.0f} s: {self.summary()}")

    def summary(self) -> str:
        counts: dict[int, int] = {}
        for answer in self.answers:
            counts[answer.status] = counts.get(answer.status, 0) + 1
        shown = [f"{a.endpoint} {a.status} {a.body}" for a in self.wrong()[:5]]
        return f"{len(self.answers)} answers by status {counts}; wrong: {shown}"


class Background:
    """A loop run as a task between `start` and `stop`."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        raise NotImplementedError


@dataclass
class LiveWriter(Background):
    """Appends a chunk to a live run every WRITE_S, as the backend's worker does; a write that
    fails while the topology changes is simply retried at the next tick."""

    sim: BackendSimulator
    conversation: str
    run_id: str
    written: list[str] = field(default_factory=list)  # entry ids Redis acknowledged
    failures: int = 0

    async def _run(self) -> None:
        n = 0
        while True:
            try:
                self.written.append(await self.sim.chunk(self.conversation, self.run_id, f"w{n} "))
                n += 1
            except Exception:  # any Redis failure mid-failover: try again at the next tick
                self.failures += 1
            await asyncio.sleep(WRITE_S)


@dataclass
class Follower(Background):
    """An `events` client of one run (the hub's listener), as an EventSource: whenever a
    response ends without `end` (Redis failed, shutdown) it reconnects with Last-Event-ID.
    Every entry id it was sent, in order."""

    served: Served
    conversation: str
    run_id: str
    ids: list[str] = field(default_factory=list)
    reconnects: int = 0

    async def _run(self) -> None:
        async with http_client() as http:
            while True:
                last = self.ids[-1] if self.ids else None
                with contextlib.suppress(httpx.HTTPError):
                    async with open_events(
                        http, self.served, self.conversation, last_event_id=last, run_id=self.run_id
                    ) as response:
                        if response.status_code == 200:
                            async for event in sse_events(response):
                                if "id" in event:
                                    self.ids.append(event["id"])
                self.reconnects += 1
                await asyncio.sleep(0.1)

    async def check(self, stream: list[str], *, lost: bool = False, timeout_s: float = 10) -> None:
        """Every entry of the stream (its ids, as XRANGE lists them) received exactly once, in
        order. `lost`: a primary was killed, so an entry it acknowledged and sent to us may
        have died with it (replication is asynchronous); only such extra entries are allowed."""
        with contextlib.suppress(AssertionError):
            await until(lambda: set(stream) <= set(self.ids), timeout_s, "the follower has caught up")
        if not lost:
            assert self.ids == stream, f"sent {len(self.ids)} entries for a stream of {len(stream)}"
            return
        assert self.ids == sorted(set(self.ids), key=_id_order), "a duplicate or out of order"
        assert set(stream) <= set(self.ids), f"{len(set(stream) - set(self.ids))} entries never sent"


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)
