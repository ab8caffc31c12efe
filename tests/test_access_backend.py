"""The `backend` access policy against a real loopback fake backend: every
status branch, timeouts, the per-(token, conversation) cache, its bound, and
the collapsing of concurrent identical checks. Calls are counted at the server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from session_sidecar.access import BackendPolicy, RunOwnerPolicy, make_policy
from session_sidecar.auth import Identity, token_hash
from session_sidecar.errors import Forbidden, Unauthorized, Unavailable
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import open_api, token
from tests.jwt_helpers import FakeBackend

MakeSettings = Callable[..., Settings]
RUN_IDS = ("conversation:alice:m1", "conversation:bob:m2", "client-supplied-id")


def identity(user: str = "alice", raw: str | None = None) -> Identity:
    raw = raw or f"token-of-{user}"
    return Identity(user_id=user, token_hash=token_hash(raw), authorization=f"Bearer {raw}")


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    with FakeBackend({"ok": 200, "no-content": 204, "unauth": 401, "forbidden": 403}) as server:
        yield server


@pytest.fixture
def backend_settings(make_settings: MakeSettings, backend: FakeBackend) -> Callable[..., Settings]:
    def make(**fields: object) -> Settings:
        defaults: dict[str, object] = {
            "access_policy": "backend",
            "backend_url": backend.base_url,
            "backend_timeout_ms": 300,
        }
        return make_settings(**{**defaults, **fields})

    return make


@pytest.fixture
async def policy_for(
    backend_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., BackendPolicy]]:
    opened: list[BackendPolicy] = []

    def make(**fields: object) -> BackendPolicy:
        policy = BackendPolicy(backend_settings(**fields))
        opened.append(policy)
        return policy

    yield make
    for policy in opened:
        await policy.close()


@pytest.fixture
def policy(policy_for: Callable[..., BackendPolicy]) -> BackendPolicy:
    return policy_for()


@pytest.mark.parametrize("conversation", ["ok", "no-content"])
async def test_2xx_allows_every_run(backend: FakeBackend, policy: BackendPolicy, conversation: str) -> None:
    visible = await policy.visible_runs(identity("alice"), conversation)
    assert all(visible(run_id) for run_id in RUN_IDS)  # shared conversations: other users' runs too
    assert [(c.conversation_id, c.authorization) for c in backend.calls] == [
        (conversation, "Bearer token-of-alice")
    ]


async def test_401_is_401(policy: BackendPolicy) -> None:
    with pytest.raises(Unauthorized) as caught:
        await policy.visible_runs(identity(), "unauth")
    assert caught.value.status_code == 401
    assert caught.value.reason == "backend_unauthorized"
    assert caught.value.headers == {"WWW-Authenticate": 'Bearer error="invalid_token"'}


@pytest.mark.parametrize("conversation", ["forbidden", "unknown-conversation"])  # 403, 404
async def test_403_and_404_are_403(policy: BackendPolicy, conversation: str) -> None:
    with pytest.raises(Forbidden) as caught:
        await policy.visible_runs(identity(), conversation)
    assert caught.value.status_code == 403


@pytest.mark.parametrize("status", [500, 502, 503, 429, 400, 302])
async def test_unexpected_answers_are_503_and_not_cached(
    backend: FakeBackend, policy: BackendPolicy, status: int
) -> None:
    backend.statuses["odd"] = status
    with FakeBackend({"odd": 200}) as elsewhere:
        backend.redirect_to = f"{elsewhere.base_url}/api/v1/conversations/odd/info/"
        for _ in range(2):
            with pytest.raises(Unavailable) as caught:
                await policy.visible_runs(identity(), "odd")
            assert caught.value.status_code == 503
            assert caught.value.reason == "backend"
            assert int(caught.value.headers["Retry-After"]) >= 1
        assert elsewhere.calls == []  # a redirect never carries the caller's token elsewhere
    assert backend.calls_for("odd") == 2


async def test_unreachable_backend_is_503(backend: FakeBackend, policy: BackendPolicy) -> None:
    backend.stop()
    with pytest.raises(Unavailable):
        await policy.visible_runs(identity(), "ok")


async def test_slow_backend_is_503_within_the_timeout(backend: FakeBackend, policy: BackendPolicy) -> None:
    backend.delay_s = 1.0
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await policy.visible_runs(identity(), "ok")
    assert time.monotonic() - started < 0.7


async def test_answers_are_cached_per_token_and_conversation(
    backend: FakeBackend, policy: BackendPolicy
) -> None:
    alice, bob = identity("alice"), identity("bob")
    for _ in range(3):
        await policy.visible_runs(alice, "ok")
        with pytest.raises(Forbidden):
            await policy.visible_runs(alice, "forbidden")
        with pytest.raises(Unauthorized):
            await policy.visible_runs(alice, "unauth")
    assert [backend.calls_for(c) for c in ("ok", "forbidden", "unauth")] == [1, 1, 1]
    # Another token (even of the same user) or another conversation is another question.
    await policy.visible_runs(bob, "ok")
    await policy.visible_runs(identity("alice", raw="alice-second-token"), "ok")
    await policy.visible_runs(alice, "no-content")
    assert backend.calls_for("ok") == 3
    assert backend.calls_for("no-content") == 1


async def test_cached_answer_expires(backend: FakeBackend, policy_for: Callable[..., BackendPolicy]) -> None:
    policy = policy_for(access_cache_ttl_s=1)
    await policy.visible_runs(identity(), "ok")
    await policy.visible_runs(identity(), "ok")
    assert backend.calls_for("ok") == 1
    await asyncio.sleep(1.05)
    await policy.visible_runs(identity(), "ok")
    assert backend.calls_for("ok") == 2


async def test_ttl_zero_disables_the_cache(
    backend: FakeBackend, policy_for: Callable[..., BackendPolicy]
) -> None:
    policy = policy_for(access_cache_ttl_s=0)
    for _ in range(3):
        await policy.visible_runs(identity(), "ok")
    assert backend.calls_for("ok") == 3


async def test_cache_is_bounded(backend: FakeBackend, policy_for: Callable[..., BackendPolicy]) -> None:
    backend.statuses.update({"a": 200, "b": 200, "c": 200})
    policy = policy_for(access_cache_size=2)
    for conversation in ("a", "b", "c", "c", "b", "a"):
        await policy.visible_runs(identity(), conversation)
    assert [backend.calls_for(c) for c in ("a", "b", "c")] == [2, 1, 1]


async def test_concurrent_identical_checks_make_one_call(backend: FakeBackend, policy: BackendPolicy) -> None:
    backend.delay_s = 0.15
    alice, bob = identity("alice"), identity("bob")
    filters = await asyncio.gather(*(policy.visible_runs(who, "ok") for who in [alice] * 10 + [bob] * 10))
    assert all(f("conversation:carol:x") for f in filters)
    assert backend.calls_for("ok") == 2  # one per token


async def test_concurrent_failures_are_shared_then_retried(
    backend: FakeBackend, policy: BackendPolicy
) -> None:
    backend.statuses["down"] = 502
    backend.delay_s = 0.15
    results = await asyncio.gather(
        *(policy.visible_runs(identity(), "down") for _ in range(8)), return_exceptions=True
    )
    assert all(isinstance(r, Unavailable) for r in results)
    assert backend.calls_for("down") == 1
    with pytest.raises(Unavailable):
        await policy.visible_runs(identity(), "down")
    assert backend.calls_for("down") == 2


async def test_a_caller_giving_up_does_not_cancel_the_shared_call(
    backend: FakeBackend, policy: BackendPolicy
) -> None:
    backend.delay_s = 0.15
    impatient = asyncio.create_task(asyncio.wait_for(policy.visible_runs(identity(), "ok"), 0.03))
    patient = asyncio.create_task(policy.visible_runs(identity(), "ok"))
    with pytest.raises(TimeoutError):
        await impatient
    assert (await patient)("conversation:bob:x")
    assert backend.calls_for("ok") == 1


async def test_development_identity_forwards_no_header(backend: FakeBackend, policy: BackendPolicy) -> None:
    await policy.visible_runs(Identity(user_id="dev-user"), "ok")  # development mode's, no token
    assert backend.calls[0].authorization is None


async def test_conversation_id_is_quoted_into_the_path(backend: FakeBackend, policy: BackendPolicy) -> None:
    with pytest.raises(Forbidden):
        await policy.visible_runs(identity(), "../../admin")
    assert backend.calls[0].conversation_id == "..%2F..%2Fadmin"


def test_make_policy(make_settings: MakeSettings, backend: FakeBackend) -> None:
    assert isinstance(make_policy(make_settings()), RunOwnerPolicy)
    assert isinstance(
        make_policy(make_settings(access_policy="backend", backend_url=backend.base_url)), BackendPolicy
    )


# --- through the app ---------------------------------------------------------------------


async def _get(
    client: httpx.AsyncClient, settings: Settings, conversation: str, headers: dict[str, str]
) -> tuple[int, dict[str, object], str]:
    path = f"{settings.api_prefix}/conversations/{conversation}/active-session"
    response = await client.get(path, headers=headers)
    return response.status_code, response.json(), response.headers.get("www-authenticate", "")


async def test_backend_policy_over_http(
    backend: FakeBackend, backend_settings: Callable[..., Settings], sim: BackendSimulator
) -> None:
    backend.statuses.update({"shared": 200, "private": 403, "gone": 404, "broken": 500})
    for conversation in ("shared", "private", "gone", "broken", "unauth"):
        await sim.full_run(conversation, "bob", status=None)
    settings = backend_settings()
    alice = {"Authorization": f"Bearer {token('alice')}"}
    async for api in open_api(settings):
        get = functools.partial(_get, api.client, settings)
        status, body, _ = await get("shared", alice)
        assert status == 200 and body["sessionId"] == "conversation:bob:new"  # a run of someone else
        for conversation, expected in (("private", 403), ("gone", 403), ("broken", 503), ("unauth", 401)):
            status, body, challenge = await get(conversation, alice)
            assert status == expected, conversation
            assert body == {"error": body["error"], "conversationId": conversation}
            assert (challenge == 'Bearer error="invalid_token"') == (expected == 401)
        await get("shared", alice)
        assert backend.calls_for("shared") == 1  # the second request was answered from the cache
        # A token the sidecar refuses never reaches the backend.
        status, _, _ = await get("shared", {"Authorization": "Bearer garbage"})
        assert status == 401
        assert len(backend.calls) == 5


MALFORMED_IDS = ["bad:id", "a%20b", "x" * 129, "caf%C3%A9", "semi;colon", "%00"]


async def test_a_malformed_conversation_id_never_reaches_the_backend(
    backend: FakeBackend, backend_settings: Callable[..., Settings]
) -> None:
    settings = backend_settings()
    alice = {"Authorization": f"Bearer {token('alice')}"}
    async for api in open_api(settings):
        for conversation in MALFORMED_IDS:
            base = f"{settings.api_prefix}/conversations/{conversation}"
            for method, path in (
                ("GET", f"{base}/active-session"),
                ("GET", f"{base}/task-status"),
                ("GET", f"{base}/events"),
                ("POST", f"{base}/resume/conversation:alice:m1"),
            ):
                response = await api.client.request(method, path, headers=alice)
                assert response.status_code == 400, (conversation, path, response.text)
                assert response.json()["error"] == "Malformed conversation id"
    assert backend.calls == []


async def test_a_failing_backend_is_logged_by_the_policy_and_counted_by_upstream(
    backend: FakeBackend,
    backend_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend.statuses["broken"] = 500
    settings = backend_settings()
    async for api in open_api(settings):
        with caplog.at_level(logging.INFO):
            status, _, _ = await _get(
                api.client, settings, "broken", {"Authorization": f"Bearer {token('a')}"}
            )
        assert status == 503
        metrics = (await api.client.get("/metrics")).text
    assert 'sidecar_upstream_errors_total{upstream="backend"} 1.0' in metrics
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name != "httpx"]
    # The access log's logger holds one line per request, and nothing else.
    assert records == [
        ("session_sidecar.policy", logging.WARNING, "backend access check: unexpected HTTP 500"),
        ("session_sidecar.access", logging.INFO, "request"),
    ]
    (access,) = [r for r in caplog.records if r.name == "session_sidecar.access"]
    assert access.__dict__["reason"] == "backend"


async def test_run_owner_policy_reveals_only_own_runs(
    make_settings: MakeSettings, sim: BackendSimulator
) -> None:
    await sim.full_run("shared", "bob", status=None)
    settings = make_settings()
    async for api in open_api(settings):
        path = f"{settings.api_prefix}/conversations/shared/active-session"
        response = await api.client.get(path, headers={"Authorization": f"Bearer {token('alice')}"})
        assert response.status_code == 404
        assert response.json() == {"error": "No active session found", "conversationId": "shared"}
