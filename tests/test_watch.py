"""Watch (SPEC 8.3): ETags, long-poll in both forms, one shared watch per conversation, against
a real Redis with data written by the backend simulator. Bounds are generous (2 noisy cores)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from session_sidecar.derive import RunState, RunView
from session_sidecar.embedded import NOTIFY_FLAGS, free_port
from session_sidecar.errors import BadRequest
from session_sidecar.index import LiveIndex
from session_sidecar.sessions import Lookup
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from session_sidecar.watch import WatchHub, version
from session_sidecar.watch.versions import wanted
from tests.conftest import TEST_SECRET, Api, auth, open_api
from tests.live_server import serve_in_thread

CONV = "conv-watch"
NOTICE_S = 1.5  # SPEC: within one second; the rest is slack for a loaded 2-core machine
# Every command the sidecar reads with.
READS = ("xrange", "xrevrange", "xlen", "xinfo|stream", "get", "pttl", "scan")


async def wait_for(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def hub_of(api: Api) -> WatchHub:
    hub: WatchHub = api.app.state.sidecar.watch
    return hub


async def open_watched(settings: Settings) -> AsyncIterator[Api]:
    """The app with its live index in sync and following `set`/`xadd` events."""
    async for api in open_api(settings):
        index = api.app.state.sidecar.index
        assert isinstance(index, LiveIndex)
        await wait_for(lambda: hub_of(api).trusted)
        yield api


@pytest.fixture
async def watched(make_settings: Callable[..., Settings], redis_client: aioredis.Redis) -> AsyncIterator[Api]:
    async for api in open_watched(make_settings(index_mode="index", index_resync_s=3600)):
        yield api


def path(api: Api, conversation: str, endpoint: str) -> str:
    return f"{api.settings.api_prefix}/conversations/{conversation}/{endpoint}"


async def get(
    api: Api,
    endpoint: str = "task-status",
    *,
    conversation: str = CONV,
    user: str = "alice",
    headers: dict[str, str] | None = None,
    wait: str | None = None,
    since: str | None = None,
) -> httpx.Response:
    params = {name: value for name, value in (("wait", wait), ("since", since)) if value is not None}
    return await api.client.get(
        path(api, conversation, endpoint),
        params=params,
        headers={**auth(user), **(headers or {})},
        timeout=90,
    )


async def held(
    api: Api, since: str, endpoint: str = "task-status", wait: str = "20"
) -> asyncio.Task[httpx.Response]:
    """A waiting request, started and counted as held before this returns."""
    hub = hub_of(api)
    before = hub.held
    task = asyncio.create_task(get(api, endpoint, since=since, wait=wait))
    await wait_for(lambda: hub.held > before or task.done())
    assert not task.done(), "answered at once instead of waiting"
    return task


async def answered_within(task: Awaitable[httpx.Response], since: float) -> httpx.Response:
    response = await asyncio.wait_for(task, timeout=10)
    elapsed = time.monotonic() - since
    assert elapsed <= NOTICE_S, f"the change took {elapsed:.2f} s to reach the waiter"
    return response


# -- versions and parameters: pure ------------------------------------------------------------------


def _lookup(run_id: str, state: RunState, cursor: str = "1-0", estimate: int = 0) -> Lookup:
    ms = int(cursor.partition("-")[0])
    return Lookup(RunView(run_id, state, cursor, 1, ms, ms if state is RunState.FINISHED else None), estimate)


def test_version_is_made_of_the_watched_facts_only() -> None:
    working = _lookup("r1", RunState.WORKING, "100-0", 5000)
    later = _lookup("r1", RunState.WORKING, "900-3", 7000)  # new chunks, another estimate
    for endpoint in ("task-status", "active-session"):
        assert version(endpoint, working) == version(endpoint, later)
        assert version(endpoint, working) != version(endpoint, _lookup("r2", RunState.WORKING))
        assert version(endpoint, working) != version(endpoint, _lookup("r1", RunState.FINISHED))
        assert version(endpoint, None) == version(endpoint, None) != version(endpoint, working)
    # isActive is false for an idle and a finished run alike; status tells them apart.
    idle, done = _lookup("r1", RunState.IDLE), _lookup("r1", RunState.FINISHED)
    assert version("task-status", idle) == version("task-status", done)
    assert version("active-session", idle) != version("active-session", done)


def test_wait_parameters() -> None:
    assert wanted("5", None, None, [], 50) is None  # wait without since: at once
    assert wanted("5", "", None, [], 50) is None
    assert wanted(None, '"v1"', None, [], 50) is None  # since without wait: at once
    asked = wanted("120", '"v1"', None, [], 50)
    assert asked is not None and asked.since == {"v1"} and asked.wait_s == 50 and not asked.not_modified
    asked = wanted("2.5", "v1", '"other"', ["wait=9"], 50)  # the query form wins
    assert asked is not None and asked.since == {"v1"} and asked.wait_s == 2.5
    assert asked.preference_applied is None
    for bad in ("", "-1", "abc", "1e3", "nan", "inf", " 5"):
        with pytest.raises(BadRequest):
            wanted(bad, "v1", None, [], 50)
    asked = wanted(None, None, 'W/"a", "b"', ["respond-async, wait=100"], 50)
    assert asked is not None and asked.since == {"a", "b"} and asked.not_modified
    assert asked.wait_s == 50 and asked.preference_applied == "wait=50"
    asked = wanted(None, None, '"a"', ["wait=abc"], 50)  # a preference not understood is ignored
    assert asked is not None and asked.wait_s == 0 and asked.preference_applied is None
    assert wanted(None, None, None, ["wait=10"], 50) is None  # nothing to compare with


# -- ETag on every answer ---------------------------------------------------------------------------


async def test_every_200_and_404_carries_the_version_of_its_facts(
    watched: Api, sim: BackendSimulator
) -> None:
    tags = {}
    for endpoint in ("task-status", "active-session"):
        missing = await get(watched, endpoint)
        assert missing.status_code == 404 and missing.headers["etag"].startswith('"')
        tags[endpoint] = missing.headers["etag"]
    run_id = await sim.full_run(CONV, "alice", "m1", status=None)
    for endpoint in ("task-status", "active-session"):
        first = await get(watched, endpoint)
        assert first.status_code == 200 and first.headers["etag"] != tags[endpoint]
        tags[endpoint] = first.headers["etag"]
    await sim.chunk(CONV, run_id, "more")  # cursor and lastActivity move; the watched facts do not
    for endpoint in ("task-status", "active-session"):
        assert (await get(watched, endpoint)).headers["etag"] == tags[endpoint]
    await sim.end(CONV, run_id)
    for endpoint in ("task-status", "active-session"):
        assert (await get(watched, endpoint)).headers["etag"] != tags[endpoint]


async def test_malformed_wait_is_a_flat_400(watched: Api) -> None:
    for bad in ("", "-1", "abc", "1e3"):
        response = await get(watched, wait=bad, since='"x"')
        assert response.status_code == 400
        assert response.json() == {
            "error": "Malformed wait: a number of seconds >= 0",
            "conversationId": CONV,
        }


# -- holding and answering --------------------------------------------------------------------------


async def test_holds_while_nothing_changes_then_answers_fresh(watched: Api, sim: BackendSimulator) -> None:
    run_id = await sim.full_run(CONV, "alice", "m1", status=None)
    tag = (await get(watched, "active-session")).headers["etag"]
    started = time.monotonic()
    task = await held(watched, tag, "active-session", wait="2")
    last = ""
    for i in range(4):  # chunks move the cursor but change no watched fact
        last = await sim.chunk(CONV, run_id, f"c{i}")
        await asyncio.sleep(0.2)
    response = await task
    assert time.monotonic() - started >= 1.9
    assert response.status_code == 200 and response.headers["etag"] == tag
    assert response.json()["cursor"] == last  # the answer at the end of the wait is current


async def test_a_stale_or_missing_since_answers_at_once(watched: Api, sim: BackendSimulator) -> None:
    await sim.full_run(CONV, "alice", "m1", status=None)
    for since in ('"not-the-current-version"', "0123", None):
        started = time.monotonic()
        response = await get(watched, wait="20", since=since)
        assert time.monotonic() - started < 5
        assert response.status_code == 200 and response.json()["isActive"] is True


async def test_404_to_200_when_a_run_appears(watched: Api, sim: BackendSimulator) -> None:
    missing = await get(watched)
    assert missing.status_code == 404
    task = await held(watched, missing.headers["etag"].strip('"'))  # since without quotes
    run_id = await sim.new_run(CONV, "alice", "m1")
    written = time.monotonic()
    await sim.queue(CONV, run_id)
    response = await answered_within(task, written)
    assert response.status_code == 200 and response.json()["sessionId"] == run_id
    assert response.headers["etag"] != missing.headers["etag"]


async def test_an_end_entry_alone_is_noticed(watched: Api, old_sim: BackendSimulator) -> None:
    # Old backends cancel with an `end` entry only: the status key keeps `running`.
    run_id = await old_sim.full_run(CONV, "alice", "m1", status=None)
    task = await held(watched, (await get(watched)).headers["etag"])
    written = time.monotonic()
    await old_sim.cancel(CONV, run_id)
    response = await answered_within(task, written)
    assert response.json()["isActive"] is False and response.json()["sessionId"] == run_id


async def test_a_status_change_alone_is_noticed(watched: Api, sim: BackendSimulator) -> None:
    run_id = await sim.full_run(CONV, "alice", "m1", status=None)
    task = await held(watched, (await get(watched)).headers["etag"])
    written = time.monotonic()
    await sim.set_status(CONV, run_id, "error")  # SET on a key that exists: no `new` event
    response = await answered_within(task, written)
    assert response.json()["isActive"] is False


async def test_a_completed_run_and_a_new_one_are_noticed(watched: Api, sim: BackendSimulator) -> None:
    first = await sim.full_run(CONV, "alice", "m1", status=None)
    task = await held(watched, (await get(watched, "active-session")).headers["etag"], "active-session")
    written = time.monotonic()
    await sim.end(CONV, first)
    done = await answered_within(task, written)
    assert done.json()["status"] == "completed"
    task = await held(watched, done.headers["etag"], "active-session")
    written = time.monotonic()
    second = await sim.new_run(CONV, "alice", "m2")  # run-owner: a frontend-named run is hidden
    await sim.queue(CONV, second)
    response = await answered_within(task, written)
    assert response.json()["sessionId"] == second and response.json()["status"] == "active"


async def test_a_stop_that_deletes_the_run_is_noticed(watched: Api, sim: BackendSimulator) -> None:
    run_id = await sim.full_run(CONV, "alice", "m1", status=None)
    task = await held(watched, (await get(watched)).headers["etag"])
    written = time.monotonic()
    stopping = asyncio.create_task(sim.stop(CONV, run_id))
    stopped = await answered_within(task, written)
    assert stopped.status_code == 200 and stopped.json()["isActive"] is False
    if not stopping.done():  # the run is still there, about to be deleted
        task = await held(watched, stopped.headers["etag"])
        await stopping
        gone = await answered_within(task, written + 0.2)
    else:
        gone = await get(watched)
    assert gone.status_code == 404


async def test_a_working_run_going_stale_is_noticed(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    async for api in open_watched(make_settings(index_mode="index", index_resync_s=3600, stale_after_s=2)):
        run_id = await sim.full_run(CONV, "alice", "m1", status=None)
        first = await get(api)
        assert first.json()["isActive"] is True
        task = await held(api, first.headers["etag"])
        # Its last entry; then no write at all: time alone makes it idle 2 s later.
        last_id = await sim.chunk(CONV, run_id, "last words")
        last_ms = int(last_id.split("-")[0])
        stale_at = time.monotonic() + (last_ms + 2000) / 1000 - time.time()
        response = await answered_within(task, stale_at)
        assert response.json()["isActive"] is False and response.json()["sessionId"] == run_id


async def test_waiters_see_only_what_their_caller_may_see(watched: Api, sim: BackendSimulator) -> None:
    tag = (await get(watched)).headers["etag"]  # 404 for alice and bob alike
    alice = await held(watched, tag, wait="3")
    bob_task = asyncio.create_task(get(watched, user="bob", since=tag, wait="20"))
    await wait_for(lambda: hub_of(watched).held == 2)
    written = time.monotonic()
    run_id = await sim.full_run(CONV, "bob", "m1", status=None)
    bob = await answered_within(bob_task, written)
    assert bob.status_code == 200 and bob.json()["sessionId"] == run_id
    assert not alice.done()  # bob's run is invisible to alice (run-owner): nothing changed for her
    assert (await alice).status_code == 404


# -- the HTTP form, the cap, the limit --------------------------------------------------------------


async def test_if_none_match_with_prefer_wait(watched: Api, sim: BackendSimulator) -> None:
    run_id = await sim.full_run(CONV, "alice", "m1", status=None)
    tag = (await get(watched)).headers["etag"]
    started = time.monotonic()
    same = await get(watched, headers={"If-None-Match": tag, "Prefer": "wait=1"})
    assert time.monotonic() - started >= 0.9
    assert same.status_code == 304 and same.content == b""
    assert same.headers["etag"] == tag and same.headers["preference-applied"] == "wait=1"
    assert same.headers["cache-control"] == "no-store"

    conditional = await get(watched, headers={"If-None-Match": tag})  # no Prefer: at once
    assert conditional.status_code == 304 and "preference-applied" not in conditional.headers

    task = asyncio.create_task(get(watched, headers={"If-None-Match": tag, "Prefer": "wait=20"}))
    await wait_for(lambda: hub_of(watched).held == 1)
    written = time.monotonic()
    await sim.end(CONV, run_id)
    changed = await answered_within(task, written)
    assert changed.status_code == 200 and changed.json()["isActive"] is False
    assert changed.headers["preference-applied"] == "wait=20" and changed.headers["etag"] != tag

    news = await get(watched, headers={"If-None-Match": '"old"', "Prefer": "wait=20"})
    assert news.status_code == 200 and news.headers["preference-applied"] == "wait=20"


async def test_wait_is_capped(make_settings: Callable[..., Settings], redis_client: aioredis.Redis) -> None:
    async for api in open_watched(make_settings(index_mode="index", index_resync_s=3600, watch_max_s=1)):
        tag = (await get(api)).headers["etag"]
        started = time.monotonic()
        response = await get(api, wait="30", since=tag)
        assert response.status_code == 404 and time.monotonic() - started < 5
        response = await get(api, headers={"If-None-Match": tag, "Prefer": "wait=30"})
        assert response.status_code == 304 and response.headers["preference-applied"] == "wait=1"


async def test_past_max_waiters_a_503(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    async for api in open_watched(make_settings(index_mode="index", index_resync_s=3600, max_waiters=2)):
        tag = (await get(api)).headers["etag"]
        first, second = await held(api, tag, wait="3"), await held(api, tag, wait="3")
        refused = await get(api, wait="3", since=tag)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json() == {"error": "Too many waiting requests", "conversationId": CONV}
        assert (await get(api, wait="3", since='"stale"')).status_code == 404  # not held: served
        assert [r.status_code for r in await asyncio.gather(first, second)] == [404, 404]


# -- shared work ------------------------------------------------------------------------------------


async def _reads(client: aioredis.Redis) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in READS)


async def test_a_hundred_waiters_cost_the_redis_work_of_one(watched: Api, sim: BackendSimulator) -> None:
    hub = hub_of(watched)
    cost = {}
    for waiters in (1, 100):
        conversation = f"cost-{waiters}"
        run_id = await sim.full_run(conversation, "alice", "m1", status=None)
        tag = (await get(watched, conversation=conversation)).headers["etag"]
        before = await _reads(sim.client)
        tasks = [
            asyncio.create_task(get(watched, conversation=conversation, since=tag, wait="20"))
            for _ in range(waiters)
        ]
        await wait_for(lambda n=waiters: hub.held == n)  # type: ignore[misc]
        await sim.set_status(conversation, run_id, "error")
        answers = await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
        assert all(a.status_code == 200 and a.json()["isActive"] is False for a in answers)
        cost[waiters] = await _reads(sim.client) - before
    assert cost[1] > 0
    assert cost[100] == cost[1], cost


# -- fallbacks ----------------------------------------------------------------------------------------


async def test_without_notifications_watches_poll(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    async for api in open_api(make_settings()):  # SCAN per request: no index at all
        run_id = await sim.full_run(CONV, "alice", "m1", status=None)
        task = await held(api, (await get(api)).headers["etag"])
        written = time.monotonic()
        await sim.set_status(CONV, run_id, "error")
        assert (await answered_within(task, written)).json()["isActive"] is False


async def test_without_set_and_xadd_events_watches_poll(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    await redis_client.config_set("notify-keyspace-events", "Egxn")  # enough for the index alone
    try:
        async for api in open_api(make_settings(index_mode="index", index_resync_s=3600)):
            index = api.app.state.sidecar.index
            await wait_for(lambda: index.in_sync)
            assert not index.follows_writes and not hub_of(api).trusted
            run_id = await sim.full_run(CONV, "alice", "m1", status=None)
            task = await held(api, (await get(api)).headers["etag"])
            written = time.monotonic()
            await sim.set_status(CONV, run_id, "error")
            assert (await answered_within(task, written)).json()["isActive"] is False
    finally:
        await redis_client.config_set("notify-keyspace-events", NOTIFY_FLAGS)


# -- the connection and the process -----------------------------------------------------------------


async def test_a_client_that_leaves_frees_its_slot(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    with serve_in_thread(make_settings(index_mode="index", watch_max_s=60)) as (base, app):
        hub: WatchHub = app.state.sidecar.watch
        url = f"/api/v1/conversations/{CONV}/task-status"
        async with httpx.AsyncClient(base_url=base) as client:
            tag = (await client.get(url, headers=auth("alice"))).headers["etag"].strip('"')
        host, port = base.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        token = auth("alice")["Authorization"]
        request = f"GET {url}?wait=50&since={tag} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        await wait_for(lambda: hub.held == 1)
        writer.close()
        left = time.monotonic()
        await wait_for(lambda: hub.held == 0, timeout_s=5)
        assert time.monotonic() - left < 2


async def test_shutdown_answers_every_waiter_before_exit(
    redis_url: str, redis_client: aioredis.Redis, sim: BackendSimulator
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_JWT_SECRET": TEST_SECRET,
        "SIDECAR_ACCESS_POLICY": "run-owner",
        "SIDECAR_HOST": "127.0.0.1",
        "SIDECAR_PORT": str(port),
        "SIDECAR_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "session_sidecar", "serve"], env=env)  # noqa: ASYNC220 (started once, not awaited)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=90) as client:
            deadline = time.monotonic() + 20
            while True:
                with_index = False
                try:
                    ready = await client.get("/readyz")
                    with_index = ready.status_code == 200
                except httpx.TransportError:
                    pass
                if with_index:
                    break
                assert time.monotonic() < deadline and proc.poll() is None, "the sidecar did not start"
                await asyncio.sleep(0.1)
            run_id = await sim.full_run(CONV, "alice", "m1", status=None)
            url = f"/api/v1/conversations/{CONV}/active-session"
            tag = (await client.get(url, headers=auth("alice"))).headers["etag"]
            waiters = [
                asyncio.create_task(
                    client.get(url, params={"wait": "50", "since": tag}, headers=auth("alice"))
                )
                for _ in range(3)
            ]
            while "sidecar_watch_waiters 3.0" not in (await client.get("/metrics")).text:
                assert time.monotonic() < deadline + 20
                await asyncio.sleep(0.1)
            stopped = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            answers = await asyncio.wait_for(asyncio.gather(*waiters), timeout=20)
            assert time.monotonic() - stopped < 5
            assert all(a.status_code == 200 and a.json()["sessionId"] == run_id for a in answers)
            assert all(a.headers["etag"] == tag for a in answers)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
