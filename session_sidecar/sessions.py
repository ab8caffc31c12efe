"""One lookup: find a conversation's runs, read their facts, derive, choose.

Both endpoints call `SessionService.lookup`, so they always choose the same run.
"""

from __future__ import annotations

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
from session_sidecar.settings import Settings
from session_sidecar.store import Found, KeySchema, RedisClient, RunFinder, read_facts, within_budget


class Lookup(msgspec.Struct, frozen=True):
    run: RunView
    estimated_completion: int

    @property
    def working(self) -> bool:
        return self.run.state is RunState.WORKING


class SessionService:
    def __init__(self, settings: Settings, client: RedisClient, finder: RunFinder):
        self.client = client
        self.finder = finder
        self.schema = KeySchema(settings.stream_prefix)
        self.rules = Rules(
            stale_after_ms=settings.stale_after_s * 1000,
            status_ttl_ms=settings.status_ttl_s * 1000,
            cursor_first=settings.active_cursor == "first",
        )
        self.durations = DurationTracker(settings.default_duration_s * 1000)
        self.timeout_s = settings.redis_timeout_ms / 1000

    async def lookup(self, conversation_id: str, visible: RunFilter) -> Lookup | None:
        """The chosen visible run, or None when the caller can see no run of this conversation."""
        if not self.schema.may_hold_runs(conversation_id):
            return None  # answered without reading a key
        found, known, facts = await within_budget(self.timeout_s, self._read(conversation_id, visible))
        # A run whose stream ends with `end` stops changing: the finder may keep its facts.
        fresh_ended = [f for f in facts if f.last_entry_type == "end" and f is not known.get(f.run_id)]
        self.finder.remember_ended(conversation_id, fresh_ended, found.epoch)
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

    async def _read(
        self, conversation_id: str, visible: RunFilter
    ) -> tuple[Found, dict[str, RunFacts], list[RunFacts]]:
        found = await self.finder.find(conversation_id)
        run_ids = [r for r in found.run_ids if visible(r)]
        known = {r: found.ended[r] for r in run_ids if r in found.ended}
        to_read = [r for r in run_ids if r not in known]
        facts = await read_facts(self.client, self.schema, conversation_id, to_read, known)
        return found, known, facts

    async def ping(self) -> bool:
        return bool(await within_budget(self.timeout_s, self.client.ping()))
