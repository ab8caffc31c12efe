"""One lookup: find a conversation's runs, read their facts, derive, choose.

Both endpoints call `SessionService.lookup`, so they always choose the same run.
"""

from __future__ import annotations

import asyncio
import functools
import time

import msgspec

from session_sidecar.access import RunFilter
from session_sidecar.derive import (
    DurationTracker,
    Rules,
    RunFacts,
    RunState,
    RunView,
    choose_run,
    derive_run,
    estimated_completion,
)
from session_sidecar.ended import Known
from session_sidecar.settings import Settings
from session_sidecar.store.client import RedisClient, redis_timeout_s, within_budget
from session_sidecar.store.facts import RUNS_PER_TRIP, Found, RunFinder, read_facts
from session_sidecar.store.keys import KeySchema

# A facts read of more runs than this takes several round trips (facts.RUNS_PER_TRIP) and
# may outlast the budget: 5,000 runs, 15,000 commands, take over a second. The request then
# answers 503 at its deadline, but the read goes on (one per conversation, at most
# MAX_LARGE_READS at a time), so that the ended runs' facts reach the finder's memory: the
# conversation's next lookup reads one XINFO STREAM per ended run, and answers.
LARGE_READ_RUNS = RUNS_PER_TRIP
MAX_LARGE_READS = 4


class Lookup(msgspec.Struct, frozen=True):
    run: RunView
    estimated_completion: int

    @property
    def working(self) -> bool:
        return self.run.state is RunState.WORKING


class SessionService:
    def __init__(
        self, settings: Settings, client: RedisClient, finder: RunFinder, reads: RedisClient | None = None
    ):
        self.client = client
        # SIDECAR_READ_FROM_REPLICAS: the facts of a lookup from replicas, unless it asks for the primary.
        self.reads = client if reads is None else reads
        self.finder = finder
        self.schema = KeySchema(settings.stream_prefix)
        self.rules = Rules(
            stale_after_ms=settings.stale_after_s * 1000,
            status_ttl_ms=settings.status_ttl_s * 1000,
            cursor_first=settings.active_cursor == "first",
        )
        self.durations = DurationTracker(settings.default_duration_s * 1000)
        self.timeout_s = redis_timeout_s(settings)
        self._large_reads: dict[str, asyncio.Task[list[RunFacts]]] = {}

    async def lookup(
        self, conversation_id: str, visible: RunFilter, *, primary: bool = False
    ) -> Lookup | None:
        """The chosen visible run, or None when the caller can see no run of this conversation.
        `primary`: read the facts on the primary even when requests read replicas."""
        if not self.schema.may_hold_runs(conversation_id):
            return None  # answered without reading a key
        facts = await within_budget(self.timeout_s, self._read(conversation_id, visible, primary))
        now_ms = int(time.time() * 1000)
        views = []
        for fact in facts:
            self.durations.observe(conversation_id, fact)
            view = derive_run(fact, now_ms, self.rules)
            if view is not None:
                views.append(view)
        chosen = choose_run(views)
        if chosen is None:
            return None
        return Lookup(chosen, estimated_completion(chosen, now_ms, self.durations.typical_ms()))

    async def _read(self, conversation_id: str, visible: RunFilter, primary: bool) -> list[RunFacts]:
        while True:
            found = await self.finder.find(conversation_id)
            run_ids = [r for r in found.run_ids if visible(r)]
            known = Known({}, 0) if found.ended is None else found.ended.known(run_ids)
            to_read = [r for r in run_ids if r not in known.facts]
            pending = self._large_reads.get(conversation_id)
            if (
                len(to_read) <= LARGE_READ_RUNS
                or found.ended is None  # the finder keeps no facts: nothing to finish a read for
                or (pending is None and len(self._large_reads) >= MAX_LARGE_READS)
            ):
                return await self._read_facts(conversation_id, found, to_read, known, primary)
            if pending is None:
                break
            # One large read per conversation at a time: wait for it (within this request's
            # budget), then look again: the ended runs' facts are known by then.
            await asyncio.wait({pending})
        # Past the request's deadline the read still needs a bound of its own (the requests'
        # client has no socket timeout): one budget per round trip.
        limit_s = self.timeout_s * -(-len(to_read) // RUNS_PER_TRIP)
        reading = self._read_facts(conversation_id, found, to_read, known, primary)
        read = asyncio.create_task(within_budget(limit_s, reading))
        self._large_reads[conversation_id] = read
        read.add_done_callback(functools.partial(self._large_read_done, conversation_id))
        return await asyncio.shield(read)  # the request's deadline ends this wait, not the read

    def _large_read_done(self, conversation_id: str, read: asyncio.Task[list[RunFacts]]) -> None:
        if self._large_reads.get(conversation_id) is read:
            del self._large_reads[conversation_id]
        if not read.cancelled():
            read.exception()  # a failure was the 503 of the request that waited, if one still did

    async def _read_facts(
        self,
        conversation_id: str,
        found: Found,
        to_read: list[str],
        known: Known,
        primary: bool,
    ) -> list[RunFacts]:
        client = self.client if primary else self.reads
        facts = await read_facts(client, self.schema, conversation_id, to_read, known.facts)
        if found.ended is not None:
            found.ended.remember(facts, known.since)  # it keeps those of runs that ended
        return facts

    async def ping(self) -> bool:
        return bool(await within_budget(self.timeout_s, self.client.ping()))
