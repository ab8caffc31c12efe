"""Which runs of a conversation a caller may see (SPEC section 5).

A policy returns a `RunFilter`: a predicate over run ids, applied before any
run's facts are read, so another user's run is never even fetched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from session_sidecar.auth import Identity
from session_sidecar.settings import Settings

RunFilter = Callable[[str], bool]


class AccessPolicy(Protocol):
    async def visible_runs(self, identity: Identity, conversation_id: str) -> RunFilter: ...

    async def close(self) -> None: ...


class RunOwnerPolicy:
    """A caller sees only runs whose id starts with `conversation:{their user id}:`."""

    async def visible_runs(self, identity: Identity, conversation_id: str) -> RunFilter:
        prefix = f"conversation:{identity.user_id}:"
        return lambda run_id: run_id.startswith(prefix)

    async def close(self) -> None:
        return None


def make_policy(settings: Settings) -> AccessPolicy:
    if settings.access_policy == "run-owner":
        return RunOwnerPolicy()
    raise NotImplementedError("access policy 'backend' is not built yet")
