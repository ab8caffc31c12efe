"""One watch per (conversation, visibility) per process (SPEC 8.3, 8.4; docs/watch.md).

A watch keeps the last answer read for one conversation as one set of callers
sees it, and reads it again, once for all its waiters, whenever that answer may
have changed: a key event of one of its visible runs (the live index), the
moment its working run would go stale, a probe after its stream fell quiet, a
safety period; or, without trustworthy notifications, on a short timer. So the
Redis work of a watch does not depend on how many requests wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

from prometheus_client import Counter, Gauge

from session_sidecar.access import RunFilter
from session_sidecar.derive import RunState, entry_ms, estimated_completion
from session_sidecar.errors import ApiError
from session_sidecar.index import KeyEvent, LiveIndex
from session_sidecar.observability import Metrics
from session_sidecar.sessions import Lookup, SessionService
from session_sidecar.settings import Settings
from session_sidecar.store.client import within_budget
from session_sidecar.watch.versions import Endpoint, Wanted, matches

PROMPT_S = 0.02  # the backend writes in pairs (status SET, then XADD): one read for both
MIN_GAP_S = 0.2  # a watch reads at most ~5 times a second, however busy its keys are
QUIET_S = 0.25  # the chosen run's stream silent this long: is its last entry `end`?
POLL_S = 0.7  # without trustworthy notifications, each watch is read this often
RETRY_S = 0.05  # after a failed read, doubling up to POLL_S
SAFETY_S = 30.0  # with them, a watch with waiters is read at least this often anyway
FRESH_S = 1.0  # a read this recent may be sent as it is (cursor, lastActivity)
LINGER_S = 5.0  # a watch outlives its last waiter this long: clients come back at once
TICK_S = 0.2
MAX_READS = 32  # reads in flight for all watches together (a re-seed re-reads them all)
CLOSE_WAIT_S = 2.0  # at close, how long held requests may take to be answered
STALE_MARGIN_MS = 5  # read just after the stale deadline, never just before it


class TooManyWaiters(ApiError):
    status_code = 503
    message = "Too many waiting requests"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class Watch:
    __slots__ = (
        "again",
        "changed",
        "conversation_id",
        "deadline",
        "dropped",
        "failures",
        "found",
        "has_read",
        "idle_since",
        "probe",
        "read_at",
        "reading",
        "timer",
        "timer_at",
        "touched",
        "tried_at",
        "visible",
        "waiters",
    )

    def __init__(self, conversation_id: str, visible: RunFilter, loop: asyncio.AbstractEventLoop):
        self.conversation_id = conversation_id
        self.visible = visible
        self.found: Lookup | None = None
        self.has_read = False
        self.read_at = -math.inf  # loop time at which the last good read began
        self.tried_at = -math.inf  # ... and the last read, good or failed
        self.failures = 0  # reads failed in a row (Redis down, over budget)
        # A key of a visible run changed since the last read began: that read may be out of date.
        self.touched = True
        # Resolved (and replaced) whenever the chosen run or its state changes.
        self.changed: asyncio.Future[None] = loop.create_future()
        self.waiters = 0  # requests in `hold`, held or being answered
        self.idle_since = loop.time()
        self.reading: asyncio.Task[Lookup | None] | None = None
        self.again = False  # something happened during the read in flight: read once more
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        self.deadline: asyncio.TimerHandle | None = None  # the working run goes stale
        self.probe: asyncio.TimerHandle | None = None  # the chosen run's stream fell quiet
        self.dropped = False  # forgotten by the hub: a late probe or read schedules nothing more

    def cancel_timers(self) -> None:
        for handle in (self.timer, self.deadline, self.probe):
            if handle is not None:
                handle.cancel()
        self.timer = self.deadline = self.probe = None
        self.timer_at = math.inf


def _facts(found: Lookup | None) -> tuple[str, RunState] | None:
    """What every version is made of: the chosen run and its state."""
    return None if found is None else (found.run.run_id, found.run.state)


class WatchHub:
    def __init__(
        self, settings: Settings, sessions: SessionService, index: LiveIndex | None, metrics: Metrics
    ):
        self.sessions = sessions
        self._index = index
        self._max_waiters = settings.max_waiters
        self._stale_after_ms = settings.stale_after_s * 1000
        self._watches: dict[tuple[str, RunFilter], Watch] = {}
        self._by_conversation: dict[str, list[Watch]] = {}
        self._reads = asyncio.Semaphore(MAX_READS)
        self._tasks: set[asyncio.Task[Any]] = set()  # probes: referenced until done
        self._ticker: asyncio.Task[None] | None = None
        self._quiet = asyncio.Event()  # no request inside `hold`
        self._quiet.set()
        self._inside = 0
        self.held = 0
        self.closing = False
        registry = metrics.registry
        Gauge("sidecar_watch_waiters", "Requests held by a watch", registry=registry).set_function(
            lambda: self.held
        )
        Gauge("sidecar_watches", "Watches (conversation, visibility) alive", registry=registry).set_function(
            lambda: len(self._watches)
        )
        self.reads = Counter(
            "sidecar_watch_reads", "Answers read for watches, by trigger", ["trigger"], registry=registry
        )
        self.probes = Counter(
            "sidecar_watch_probes", "Last-entry probes of a quiet stream", registry=registry
        )

    @property
    def trusted(self) -> bool:
        """Every change of a watched key is heard: new/del/expired and set/xadd, in sync."""
        index = self._index
        return index is not None and index.in_sync and index.follows_writes

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        if self._index is not None:
            self._index.on_change(self._on_key_event)
        self._ticker = asyncio.create_task(self._tick(), name="watch-ticker")

    def begin_shutdown(self) -> None:
        """Answer every held request now (its normal answer); hold no new one."""
        if self.closing:
            return
        self.closing = True
        for watch in self._watches.values():
            self._wake(watch)

    async def close(self) -> None:
        self.begin_shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                await self._quiet.wait()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for watch in self._watches.values():
            watch.cancel_timers()
            if watch.reading is not None:
                watch.reading.cancel()
        for task in self._tasks:
            task.cancel()

    # -- requests ------------------------------------------------------------

    async def hold(
        self,
        conversation_id: str,
        visible: RunFilter,
        endpoint: Endpoint,
        wanted: Wanted,
        gone: asyncio.Future[Any],
    ) -> Lookup | None:
        """The answer to send: at once when the client's version is not current, else when it
        changes, the wait ends or shutdown begins. When the client leaves (`gone`), whatever is
        at hand, without reading: nobody will receive it."""
        watch = self._watch(conversation_id, visible)
        watch.waiters += 1
        self._inside += 1
        self._quiet.clear()
        try:
            found = watch.found if watch.has_read else await self._read_now(watch, "request")
            if not matches(wanted.since, endpoint, found):
                # Perhaps only this process is behind (another replica gave the client its version).
                found = await self._sendable(watch)
                if not matches(wanted.since, endpoint, found):
                    return found
            if wanted.wait_s > 0 and not self.closing and not await self._held(watch, endpoint, wanted, gone):
                return watch.found
            return await self._sendable(watch)
        finally:
            watch.waiters -= 1
            if not watch.waiters:
                watch.idle_since = asyncio.get_running_loop().time()
            self._inside -= 1
            if not self._inside:
                self._quiet.set()

    async def _held(
        self, watch: Watch, endpoint: Endpoint, wanted: Wanted, gone: asyncio.Future[Any]
    ) -> bool:
        """Wait for a change of this endpoint's version; False if the client left meanwhile."""
        if self.held >= self._max_waiters:
            raise TooManyWaiters()
        self.held += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wanted.wait_s
        try:
            while (remaining := deadline - loop.time()) > 0:
                changed = watch.changed
                # Only per-watch futures here: a hub-wide one would carry a callback per waiter.
                await asyncio.wait((changed, gone), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    return False
                if self.closing or (changed.done() and not matches(wanted.since, endpoint, watch.found)):
                    break
            return True
        finally:
            self.held -= 1

    async def _sendable(self, watch: Watch) -> Lookup | None:
        """The last read while it is certainly current or recent, else a new one (shared)."""
        age = asyncio.get_running_loop().time() - watch.read_at
        settled = watch.has_read and watch.reading is None  # a read in flight knows more: join it
        current = settled and ((self.trusted and not watch.touched) or age <= FRESH_S)
        found = watch.found if current else await self._read_now(watch, "request")
        if found is None or found.run.state is not RunState.WORKING:
            return found
        # A working run's estimate moves with the clock (never earlier than now + 1 s).
        now_ms = int(time.time() * 1000)
        return Lookup(
            found.run, estimated_completion(found.run, now_ms, self.sessions.durations.typical_ms())
        )

    def _watch(self, conversation_id: str, visible: RunFilter) -> Watch:
        key = (conversation_id, visible)
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = Watch(conversation_id, visible, asyncio.get_running_loop())
            self._by_conversation.setdefault(conversation_id, []).append(watch)
        return watch

    def _drop(self, key: tuple[str, RunFilter], watch: Watch) -> None:
        watch.dropped = True
        watch.cancel_timers()
        del self._watches[key]
        siblings = self._by_conversation[watch.conversation_id]
        siblings.remove(watch)
        if not siblings:
            del self._by_conversation[watch.conversation_id]

    # -- reads ---------------------------------------------------------------

    async def _read_now(self, watch: Watch, trigger: str) -> Lookup | None:
        if watch.reading is None:
            self._start_read(watch, trigger)
        assert watch.reading is not None
        # Shielded: one waiter leaving must not cancel the read the others wait for.
        return await asyncio.shield(watch.reading)

    def _schedule(self, watch: Watch, delay: float, trigger: str) -> None:
        """Read soon (coalesced: at most one read in flight and one timer per watch)."""
        if watch.dropped:
            return
        if watch.reading is not None:
            watch.again = True
            return
        loop = asyncio.get_running_loop()
        at = max(loop.time() + delay, watch.tried_at + MIN_GAP_S)
        if watch.timer is not None:
            if watch.timer_at <= at:
                return
            watch.timer.cancel()
        watch.timer_at = at
        watch.timer = loop.call_at(at, self._start_read, watch, trigger)

    def _start_read(self, watch: Watch, trigger: str) -> None:
        if watch.timer is not None:
            watch.timer.cancel()
        watch.timer, watch.timer_at = None, math.inf
        task = asyncio.create_task(self._read(watch, trigger))
        watch.reading = task
        task.add_done_callback(lambda done: self._after_read(watch, done))

    async def _read(self, watch: Watch, trigger: str) -> Lookup | None:
        async with self._reads:
            loop = asyncio.get_running_loop()
            started = watch.tried_at = loop.time()
            watch.touched = False
            if watch.probe is not None:  # this read answers what the probe would have asked
                watch.probe.cancel()
                watch.probe = None
            self.reads.labels(trigger).inc()
            try:
                # On the primary, whose events trigger the read: a replica may lag behind them.
                found = await self.sessions.lookup(watch.conversation_id, watch.visible, primary=True)
            except BaseException:
                watch.touched = True
                watch.failures += 1
                raise
        watch.failures = 0
        watch.read_at = started
        before, had = _facts(watch.found), watch.has_read
        watch.found, watch.has_read = found, True
        if had and before != _facts(found):
            self._wake(watch)
        self._arm_deadline(watch, None if found is None else found.run.last_activity)
        return found

    def _after_read(self, watch: Watch, task: asyncio.Task[Lookup | None]) -> None:
        watch.reading = None
        failed = not task.cancelled() and task.exception() is not None  # retrieved: joiners got it
        again, watch.again = watch.again, False
        if failed and watch.waiters:
            # A change may be pending: retry soon, backing off while Redis stays unreachable.
            self._schedule(watch, min(POLL_S, RETRY_S * 2**watch.failures), "retry")
        elif again:
            self._schedule(watch, 0, "change")

    def _wake(self, watch: Watch) -> None:
        changed, watch.changed = watch.changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    # -- triggers ------------------------------------------------------------

    def _on_key_event(self, event: KeyEvent | None) -> None:
        if event is None:  # the index re-seeded: what happened while it was not listening is unknown
            for watch in self._watches.values():
                watch.touched = True
                self._schedule(watch, PROMPT_S, "resync")
            return
        for watch in self._by_conversation.get(event.conversation_id, ()):
            if not watch.visible(event.run_id):
                continue  # a run this watch's callers cannot see changes nothing for them
            watch.touched = True
            found = watch.found
            if (
                event.event == "xadd"
                and found is not None
                and found.working
                and found.run.run_id == event.run_id
            ):
                # A chunk of the chosen working run changes no version; only `end` would, and
                # `end` is a run's last write: look once its stream has been quiet a moment.
                self._probe_later(watch, event.run_id)
            else:
                self._schedule(watch, PROMPT_S, "change")

    def _arm_deadline(self, watch: Watch, last_activity_ms: int | None) -> None:
        """A working run goes stale with no write at all: read again right after that moment."""
        if watch.deadline is not None:
            watch.deadline.cancel()
            watch.deadline = None
        if watch.dropped or last_activity_ms is None or watch.found is None or not watch.found.working:
            return
        due_ms = last_activity_ms + self._stale_after_ms + STALE_MARGIN_MS
        delay = max(0.0, due_ms / 1000 - time.time())
        watch.deadline = asyncio.get_running_loop().call_later(delay, self._stale_due, watch)

    def _stale_due(self, watch: Watch) -> None:
        watch.deadline = None
        watch.touched = True
        self._schedule(watch, 0, "deadline")

    def _probe_later(self, watch: Watch, run_id: str) -> None:
        if watch.probe is not None:
            watch.probe.cancel()
        watch.probe = asyncio.get_running_loop().call_later(QUIET_S, self._start_probe, watch, run_id)

    def _start_probe(self, watch: Watch, run_id: str) -> None:
        watch.probe = None
        task = asyncio.create_task(self._probe(watch, run_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, watch: Watch, run_id: str) -> None:
        """One `XREVRANGE COUNT 1` instead of a whole read: still a chunk, or the `end`?"""
        self.probes.inc()
        sessions = self.sessions
        key = sessions.schema.stream_key(watch.conversation_id, run_id)
        try:
            reply = await within_budget(sessions.timeout_s, sessions.client.xrevrange(key, "+", "-", count=1))
        except ApiError:
            reply = None
        last: Any = reply[0] if isinstance(reply, list) and reply else None
        if last is None or not isinstance(last[1], dict) or last[1].get(b"type") == b"end":
            self._schedule(watch, 0, "change")  # ended, gone, unreadable: read it all
            return
        entry_id = last[0].decode() if isinstance(last[0], bytes) else str(last[0])
        self._arm_deadline(watch, entry_ms(entry_id))  # still working: it goes stale later now

    async def _tick(self) -> None:
        """Drop watches nobody came back for; poll without notifications; safety reads."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            now, trusted = loop.time(), self.trusted
            for key, watch in list(self._watches.items()):
                if watch.reading is not None or watch.timer is not None:
                    continue
                if not watch.waiters and now - watch.idle_since >= LINGER_S:
                    self._drop(key, watch)
                elif (not trusted or (watch.failures and watch.waiters)) and now - watch.tried_at >= POLL_S:
                    self._schedule(watch, 0, "poll")
                elif watch.waiters and now - watch.tried_at >= SAFETY_S:
                    self._schedule(watch, 0, "safety")
