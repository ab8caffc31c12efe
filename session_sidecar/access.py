"""Which runs of a conversation a caller may see (SPEC section 5).

A policy returns a `RunFilter`: a predicate over run ids, applied before any
run's facts are read, so another user's run is never even fetched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Callable
from typing import Protocol
from urllib.parse import quote

import httpx

from session_sidecar.auth import Identity
from session_sidecar.errors import Forbidden, Unauthorized, Unavailable
from session_sidecar.settings import Settings
from session_sidecar.ttlcache import TTLCache

# Not `session_sidecar.access`: that is the access log's, one line per request.
log = logging.getLogger("session_sidecar.policy")

# Equal filters must admit the same runs: the watch shares one read between callers
# whose filters are equal (docs/watch.md).
RunFilter = Callable[[str], bool]


class AccessPolicy(Protocol):
    async def visible_runs(self, identity: Identity, conversation_id: str) -> RunFilter: ...

    async def close(self) -> None: ...


class RunOwnerPolicy:
    """A caller sees only runs whose id is `conversation:{their user id}:{message id}`.

    The message id part may not hold a colon: otherwise user `a` would also match
    `conversation:a:b:m1`, a run of user `a:b`. Backend message ids never do.
    """

    async def visible_runs(self, identity: Identity, conversation_id: str) -> RunFilter:
        return OwnRuns(f"conversation:{identity.user_id}:")

    async def close(self) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class OwnRuns:
    """Runs named `{prefix}{message id}`; equal for one user, so their watches are shared."""

    prefix: str

    def __call__(self, run_id: str) -> bool:
        return run_id.startswith(self.prefix) and ":" not in run_id[len(self.prefix) :]


class Decision(enum.Enum):
    ALLOW = "allow"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"


def _every_run(run_id: str) -> bool:
    return True


class BackendPolicy:
    """Asks the backend's conversation-info endpoint, as the caller, whether they may read it.

    The backend already knows owners, shares and admins; asking it keeps one
    source of truth. Answers (allow and deny alike) are reused for
    `access_cache_ttl_s` per (token hash, conversation); failures are not
    cached. Concurrent identical questions share one outbound call.
    """

    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None):
        if not settings.backend_url:
            raise ValueError("BackendPolicy needs settings.backend_url")
        self._base = settings.backend_url.rstrip("/") + settings.api_prefix
        self._timeout_s = settings.backend_timeout_ms / 1000
        self._ttl_s = settings.access_cache_ttl_s
        self._own_http = http is None
        # Redirects are not followed: the caller's token must only ever go to the configured host.
        self._http = http if http is not None else httpx.AsyncClient(follow_redirects=False)
        self._answers: TTLCache[tuple[str, str], Decision] = TTLCache(settings.access_cache_size)
        self._inflight: dict[tuple[str, str], asyncio.Task[Decision]] = {}

    async def visible_runs(self, identity: Identity, conversation_id: str) -> RunFilter:
        decision = await self._decide(identity, conversation_id)
        if decision is Decision.ALLOW:
            return _every_run
        if decision is Decision.UNAUTHORIZED:
            raise Unauthorized(
                "Token rejected by the backend",
                reason="backend_unauthorized",
                token_sent=identity.authorization is not None,
            )
        raise Forbidden()

    async def close(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        if self._own_http:
            await self._http.aclose()

    async def _decide(self, identity: Identity, conversation_id: str) -> Decision:
        # Dev-mode identities carry no token: key them by user so they never share a token's answer.
        key = (identity.token_hash or f"user:{identity.user_id}", conversation_id)
        cached = self._answers.get(key)
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(identity.authorization, conversation_id))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._settle(key, done))
        # shield: one caller giving up must not cancel the call the others are waiting for.
        return await asyncio.shield(task)

    def _settle(self, key: tuple[str, str], task: asyncio.Task[Decision]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self._answers.set(key, task.result(), self._ttl_s)

    async def _ask(self, authorization: str | None, conversation_id: str) -> Decision:
        url = f"{self._base}/conversations/{quote(conversation_id, safe='')}/info/"
        headers = {"Accept": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        try:
            async with asyncio.timeout(self._timeout_s):
                # The body is never read: the status is the whole answer.
                async with self._http.stream("GET", url, headers=headers, timeout=self._timeout_s) as resp:
                    status = resp.status_code
        except (TimeoutError, httpx.TimeoutException):
            log.warning("backend access check: timeout after %.1f s", self._timeout_s)
            raise Unavailable("Backend unavailable", retry_after_s=2, reason="backend") from None
        except httpx.HTTPError as exc:
            log.warning("backend access check: unreachable (%s)", type(exc).__name__)
            raise Unavailable("Backend unavailable", retry_after_s=2, reason="backend") from None
        if 200 <= status < 300:
            return Decision.ALLOW
        # Refusals are not logged here: the request's access line carries the reason.
        if status == 401:
            return Decision.UNAUTHORIZED
        if status in (403, 404):
            return Decision.FORBIDDEN
        # 5xx, redirects, rate limits, anything unexpected: the answer is unknown, not "no".
        log.warning("backend access check: unexpected HTTP %d", status)
        raise Unavailable("Backend unavailable", retry_after_s=2, reason="backend")


class SingleUserPolicy:
    """Development mode without a backend: one user, who sees every run, as the backend's own
    development mode does (runs the web frontend names carry no user id to filter on)."""

    async def visible_runs(self, identity: Identity, conversation_id: str) -> RunFilter:
        return _every_run

    async def close(self) -> None:
        return None


def make_policy(settings: Settings, http: httpx.AsyncClient | None = None) -> AccessPolicy:
    policy = settings.policy
    if policy == "backend":
        return BackendPolicy(settings, http)
    if policy == "run-owner":
        return RunOwnerPolicy()
    return SingleUserPolicy()
