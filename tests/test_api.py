"""Both endpoints against a real Redis, with data written by the backend simulator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.store.client import MAX_CONNECTIONS
from tests.conftest import Api, open_api

CONV = "019953dd-6de7-7f7a-bf64-96c54db89201"


def now_ms() -> int:
    return int(time.time() * 1000)


async def test_active_session_exact_shape_order_and_headers(api: Api, sim: BackendSimulator) -> None:
    t0 = now_ms() - 5000
    run_id = await sim.full_run(CONV, "alice", "msg456", chunks=2, status=None, start_ms=t0)
    response = await api.get(CONV, "active-session")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert list(body) == ["sessionId", "status", "cursor", "conversationId", "startedAt", "lastActivity"]
    last_ms = t0 + 3 * 200
    assert body == {
        "sessionId": run_id,
        "status": "active",
        "cursor": f"{last_ms}-0",
        "conversationId": CONV,
        "startedAt": t0,
        "lastActivity": last_ms,
    }
    assert run_id == "conversation:alice:msg456"


async def test_task_status_exact_shape_and_order(api: Api, sim: BackendSimulator) -> None:
    t0 = now_ms() - 5000
    run_id = await sim.full_run(CONV, "alice", "m1", chunks=1, status=None, start_ms=t0)
    response = await api.get(CONV, "task-status")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert list(body) == ["isActive", "sessionId", "estimatedCompletion", "conversationId"]
    assert body["isActive"] is True and body["sessionId"] == run_id and body["conversationId"] == CONV
    # No finished run observed yet: started + the 60 s default.
    assert body["estimatedCompletion"] == t0 + 60_000


async def test_404_bodies_are_flat_with_exact_texts(api: Api) -> None:
    for endpoint, text in (
        ("active-session", "No active session found"),
        ("task-status", "No background task found"),
    ):
        response = await api.get(CONV, endpoint)
        assert response.status_code == 404
        assert response.headers["cache-control"] == "no-store"
        assert response.json() == {"error": text, "conversationId": CONV}


async def test_run_id_with_colons_kept_whole(api: Api, sim: BackendSimulator) -> None:
    run_id = await sim.full_run(CONV, "alice", "0193-abc", status=None)
    body = (await api.get(CONV, "active-session")).json()
    assert body["sessionId"] == run_id == "conversation:alice:0193-abc"
    assert (await api.get(CONV, "task-status")).json()["sessionId"] == run_id


async def test_suffixed_runs_latest_activity_wins_not_lexicographic(api: Api, sim: BackendSimulator) -> None:
    t = now_ms() - 60_000
    ids = []
    for i in range(11):  # -1 .. -10: "-9" sorts after "-10" as text
        ids.append(await sim.full_run(CONV, "alice", "m", chunks=1, start_ms=t + i * 2000))
    assert ids[10] == "conversation:alice:m-10"
    body = (await api.get(CONV, "active-session")).json()
    assert body["sessionId"] == "conversation:alice:m-10"
    assert body["status"] == "completed"


async def test_working_run_beats_a_later_finished_one(api: Api, sim: BackendSimulator) -> None:
    t = now_ms() - 30_000
    working = await sim.full_run(CONV, "alice", "a", chunks=1, status=None, start_ms=t)
    await sim.full_run(CONV, "alice", "b", chunks=1, start_ms=t + 5000)
    assert (await api.get(CONV, "active-session")).json()["sessionId"] == working
    assert (await api.get(CONV, "task-status")).json()["sessionId"] == working


async def test_end_entry_wins_over_running_left_by_old_backend(api: Api, old_sim: BackendSimulator) -> None:
    t = now_ms() - 10_000
    run_id = await old_sim.full_run(CONV, "alice", "m", chunks=2, status="cancelled", start_ms=t)
    status = await old_sim.client.get(old_sim.status_key(CONV, run_id))
    assert status == b"running"  # what old backends leave behind
    body = (await api.get(CONV, "active-session")).json()
    assert body["status"] == "completed"
    task = (await api.get(CONV, "task-status")).json()
    assert task["isActive"] is False
    assert task["estimatedCompletion"] == t + 4 * 200  # the end entry's real time


async def test_expired_status_with_live_stream_is_still_working(api: Api, sim: BackendSimulator) -> None:
    t = now_ms() - 700_000  # a run longer than the status TTL
    run_id = await sim.full_run(CONV, "alice", "long", chunks=1, status=None, start_ms=t)
    await sim.chunk(CONV, run_id, "still going", now_ms() - 1000)
    await sim.client.delete(sim.status_key(CONV, run_id))
    assert (await api.get(CONV, "active-session")).json()["status"] == "active"
    assert (await api.get(CONV, "task-status")).json()["isActive"] is True


async def test_stale_worker_becomes_idle(api: Api, sim: BackendSimulator) -> None:
    t = now_ms() - 20 * 60_000
    await sim.full_run(CONV, "alice", "dead", chunks=2, status=None, start_ms=t)  # status still `running`
    body = (await api.get(CONV, "active-session")).json()
    assert body["status"] == "idle"
    task = (await api.get(CONV, "task-status")).json()
    assert task["isActive"] is False
    assert task["estimatedCompletion"] == body["lastActivity"] == t + 3 * 200


async def test_stale_window_setting(make_settings: Callable[..., Settings], sim: BackendSimulator) -> None:
    await sim.full_run(CONV, "alice", "m", chunks=1, status=None, start_ms=now_ms() - 90_000)
    async for api in open_api(make_settings(stale_after_s=60)):
        assert (await api.get(CONV, "active-session")).json()["status"] == "idle"
    async for api in open_api(make_settings(stale_after_s=600)):
        assert (await api.get(CONV, "active-session")).json()["status"] == "active"


async def test_queued_run_without_stream_dated_from_pttl(api: Api, redis_client: aioredis.Redis) -> None:
    # A queued run can have a status key and no stream yet (older dispatch order).
    await redis_client.set(f"task:status:{CONV}:conversation:alice:q", "queued", px=590_000)
    before = now_ms()
    body = (await api.get(CONV, "active-session")).json()
    assert body["status"] == "active"
    assert body["cursor"] == "0-0"
    assert before - 10_000 - 1000 <= body["startedAt"] <= now_ms() - 10_000 + 50
    assert body["lastActivity"] == body["startedAt"]


async def test_finished_estimated_completion_is_real_end_time(api: Api, sim: BackendSimulator) -> None:
    t = now_ms() - 3_600_000
    await sim.full_run(CONV, "alice", "m", chunks=3, start_ms=t)
    body = (await api.get(CONV, "task-status")).json()
    assert body == {
        "isActive": False,
        "sessionId": "conversation:alice:m",
        "estimatedCompletion": t + 5 * 200,
        "conversationId": CONV,
    }


async def test_typical_duration_is_median_of_observed_runs(api: Api, sim: BackendSimulator) -> None:
    t = now_ms() - 3_600_000
    durations = []
    for i, chunks in enumerate((5, 10, 20, 40, 80)):
        conv = f"done-{i}"
        await sim.full_run(conv, "alice", "m", chunks=chunks, start_ms=t, step_ms=1000)
        durations.append((chunks + 2) * 1000)
        assert (await api.get(conv, "task-status")).status_code == 200  # the service observes it
    start = now_ms() - 1000
    await sim.full_run(CONV, "alice", "live", chunks=0, status=None, start_ms=start)
    body = (await api.get(CONV, "task-status")).json()
    assert body["estimatedCompletion"] == start + sorted(durations)[2]


async def test_both_endpoints_choose_the_same_run(api: Api, sim: BackendSimulator) -> None:
    t = now_ms() - 120_000
    await sim.full_run(CONV, "alice", "a", chunks=1, start_ms=t)
    await sim.full_run(CONV, "alice", "b", chunks=1, status="error", start_ms=t + 1000)
    await sim.full_run(CONV, "alice", "c", chunks=1, status=None, start_ms=t - 700_000)  # stale
    active = (await api.get(CONV, "active-session")).json()
    task = (await api.get(CONV, "task-status")).json()
    assert active["sessionId"] == task["sessionId"] == "conversation:alice:b"


async def test_one_user_never_sees_another_users_run(api: Api, sim: BackendSimulator) -> None:
    await sim.full_run(CONV, "bob", "secret-msg", status=None)
    for endpoint in ("active-session", "task-status"):
        response = await api.get(CONV, endpoint, user="alice")
        assert response.status_code == 404
        assert "bob" not in response.text and "secret-msg" not in response.text
    # Alice's own run is shown, never Bob's newer one.
    await sim.full_run(CONV, "alice", "mine", status="completed", start_ms=now_ms() - 60_000)
    await sim.full_run(CONV, "bob", "newer", status=None)
    for endpoint in ("active-session", "task-status"):
        response = await api.get(CONV, endpoint, user="alice")
        assert response.status_code == 200
        assert "bob" not in response.text
        assert response.json()["sessionId"] == "conversation:alice:mine"


async def test_user_prefix_is_matched_with_its_colon(api: Api, sim: BackendSimulator) -> None:
    await sim.full_run(CONV, "alice2", "m", status=None)  # `conversation:alice2:` is not alice's
    assert (await api.get(CONV, "active-session", user="alice")).status_code == 404


async def test_user_ids_with_colons_cannot_alias_another_user(api: Api, sim: BackendSimulator) -> None:
    await sim.full_run(CONV, "alice:admin", "m1", status=None)  # user `alice:admin`'s run
    assert (await api.get(CONV, "active-session", user="alice")).status_code == 404
    body = (await api.get(CONV, "active-session", user="alice:admin")).json()
    assert body["sessionId"] == "conversation:alice:admin:m1"


async def test_other_conversation_never_answers(api: Api, sim: BackendSimulator) -> None:
    await sim.full_run("other-conv", "alice", "m", status=None)
    await sim.full_run(f"{CONV}x", "alice", "m", status=None)
    assert (await api.get(CONV, "active-session")).status_code == 404


async def test_custom_stream_prefix(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    sim = BackendSimulator(redis_client, stream_prefix="acme:chat")
    run_id = await sim.full_run(CONV, "alice", "m", status=None)
    async for api in open_api(make_settings(stream_prefix="acme:chat")):
        assert (await api.get(CONV, "active-session")).json()["sessionId"] == run_id
    async for api in open_api(make_settings()):
        # The status key alone (prefix `task:status`) still reveals the run, with no cursor.
        body = (await api.get(CONV, "active-session")).json()
        assert body["sessionId"] == run_id and body["cursor"] == "0-0"


async def test_api_prefix_setting(make_settings: Callable[..., Settings], sim: BackendSimulator) -> None:
    await sim.full_run(CONV, "alice", "m", status=None)
    async for api in open_api(make_settings(api_prefix="/chat/api")):
        assert (
            await api.client.get(f"/chat/api/conversations/{CONV}/task-status", headers=_alice())
        ).status_code == 200
        assert (
            await api.client.get(f"/api/v1/conversations/{CONV}/task-status", headers=_alice())
        ).status_code == 404


def _alice() -> dict[str, str]:
    from tests.conftest import auth

    return auth("alice")


async def test_a_burst_beyond_the_connection_pool_waits_rather_than_failing(
    make_settings: Callable[..., Settings], sim: BackendSimulator
) -> None:
    run_id = await sim.full_run(CONV, "alice", "m", status=None)
    # A generous budget: this is about waiting for a free connection, not about speed
    # (the plain pool failed the excess at once, whatever the budget).
    async for api in open_api(make_settings(redis_timeout_ms=5000)):
        answers = await asyncio.gather(*(api.get(CONV, "task-status") for _ in range(3 * MAX_CONNECTIONS)))
        assert {a.status_code for a in answers} == {200}
        assert {a.json()["sessionId"] for a in answers} == {run_id}
