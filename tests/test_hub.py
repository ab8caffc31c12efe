"""The hub (SPEC 8.4) against a real Redis: a fixed few connections for any number of
listeners, prompt joins, fan-out, slow listeners closed alone, killed connections
replaced without a gap or a duplicate, vanished keys noticed; and Redis Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from session_sidecar.embedded import EmbeddedRedis, find_server_binary, free_port
from session_sidecar.settings import Settings
from session_sidecar.store.client import create_client
from session_sidecar.streams import hub as hub_module
from session_sidecar.streams import readers
from session_sidecar.streams.follow import Follower, is_end, through_end
from session_sidecar.streams.hub import StreamHub
from session_sidecar.streams.listener import Closed, Listener, Reason
from session_sidecar.streams.waker import SLICE, Waker
from session_sidecar.streams.wire import ZERO, Entry, decode_page, parse_id
from tests.conftest import FAST_GONE_CHECK_S
from tests.test_index import wait_for
from tests.topology import cli_beside, cluster_ok


@contextlib.asynccontextmanager
async def running_hub(settings: Settings, **kwargs: Any) -> AsyncIterator[StreamHub]:
    client = create_client(settings)
    hub = StreamHub(settings, client, **kwargs)
    hub.start()
    try:
        yield hub
    finally:
        await hub.close()
        await client.aclose()


@pytest.fixture
async def hub(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> AsyncIterator[StreamHub]:
    async with running_hub(make_settings()) as hub:
        yield hub


async def add(client: aioredis.Redis | RedisCluster, key: str, n: int, prefix: str = "e") -> list[str]:
    ids = []
    for i in range(n):
        entry_id: Any = await client.xadd(key, {"type": "chunk", "content": f"{prefix}{i}"})
        ids.append(entry_id.decode())
    return ids


async def take(listener: Listener, n: int, timeout_s: float = 10) -> list[Entry]:
    """Exactly `n` entries (failing on more arriving with them), within `timeout_s`."""
    got: list[Entry] = []
    async with asyncio.timeout(timeout_s):
        while len(got) < n:
            got.extend(await listener.next(None))
    assert len(got) == n, got
    return got


def contents(entries: list[Entry]) -> list[str]:
    return [e.fields["content"] for e in entries]


async def hub_clients(client: aioredis.Redis) -> list[dict[str, Any]]:
    listed: Any = await client.client_list()
    return [c for c in listed if c["name"] == readers.HUB_CLIENT_NAME]


async def test_fan_out_to_every_listener_in_order(hub: StreamHub, redis_client: aioredis.Redis) -> None:
    listeners = [hub.subscribe("s1", ZERO) for _ in range(5)]
    other = hub.subscribe("s2", ZERO)
    await add(redis_client, "s1", 20)
    await add(redis_client, "s2", 3, "o")
    for listener in listeners:
        assert contents(await take(listener, 20)) == [f"e{i}" for i in range(20)]
    assert contents(await take(other, 3)) == ["o0", "o1", "o2"]
    # A join interrupts the hub's blocked read (and without that, the block ends within
    # BLOCK_MS): were history replayed to a 0-0 join, it would come well within this wait.
    wait_s = readers.BLOCK_MS / 1000 + 0.5
    batches = [await hub.subscribe("s1", ZERO).next(wait_s) for _ in range(2)]
    assert batches[0] == [] and batches[1] == []  # 0-0 on a followed stream: only what comes next


async def test_one_keepalive_timer_serves_every_wait() -> None:
    """Entries coming sooner than the wait never time it out (the one armed timer re-arms
    itself at the newest deadline), silence does, and a wait shorter than the armed
    timer ends when it should."""
    loop = asyncio.get_running_loop()
    listener = Listener("k", ZERO, 10)
    for i in range(1, 8):
        loop.call_later(0.1, listener.push, decode_page([(f"{i}-0", {b"content": f"e{i}".encode()})]))
        assert contents(await listener.next(0.3)) == [f"e{i}"]
    started = time.monotonic()
    assert await listener.next(0.3) == []
    assert time.monotonic() - started >= 0.25
    with pytest.raises(TimeoutError):  # leaves a timer armed 5 s ahead
        await asyncio.wait_for(listener.next(5.0), 0.1)
    assert await asyncio.wait_for(listener.next(0.2), 3.0) == []
    listener.stop()


async def test_listeners_are_woken_a_slice_per_turn_each_once() -> None:
    """However many listeners an entry reaches, a turn of the event loop wakes at most
    SLICE of them (so that the loop keeps turning, and accepting connections); a listener
    pushed to again before its turn is not queued twice, and reads both batches at once."""
    waker = Waker()
    listeners = [Listener("k", ZERO, 10, waker.soon) for _ in range(3 * SLICE)]
    waits = [asyncio.create_task(listener.next(None)) for listener in listeners]
    await asyncio.sleep(0)  # every one waiting
    first, second = (decode_page([(f"{i}-0", {b"content": f"e{i}".encode()})]) for i in (1, 2))
    for listener in listeners:
        listener.push(first)
        listener.push(second)
    woken = []
    for _ in range(6):
        await asyncio.sleep(0)
        woken.append(sum(wait.done() for wait in waits))
    assert all(later - earlier <= SLICE for earlier, later in itertools.pairwise([0, *woken]))
    assert woken[-1] == len(listeners) and woken.index(len(listeners)) <= 4  # 3 slices, not 6
    assert all(contents(wait.result()) == ["e1", "e2"] for wait in waits)


async def test_a_stream_joins_without_waiting_out_the_block(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "BLOCK_MS", 60_000)  # without CLIENT UNBLOCK a join would wait a minute
    monkeypatch.setattr(hub_module, "READERS", 1)
    async with running_hub(make_settings()) as hub:
        first = hub.subscribe("s1", ZERO)
        await add(redis_client, "s1", 1)
        await take(first, 1)  # the reader is now blocked on s1 alone
        await asyncio.sleep(0.2)
        for i in range(5):  # each join interrupts the block
            joined = hub.subscribe(f"j{i}", ZERO)
            await add(redis_client, f"j{i}", 1)
            assert contents(await take(joined, 1, timeout_s=20)) == ["e0"]
        hub.unsubscribe(first)
        await add(redis_client, "s1", 1)  # nobody listens: read at most once, delivered to no one


async def test_a_slow_listener_is_closed_alone(
    make_settings: Callable[..., Settings], redis_client: aioredis.Redis
) -> None:
    async with running_hub(make_settings(), buffer=4) as hub:
        slow = hub.subscribe("s1", ZERO)
        fast = hub.subscribe("s1", ZERO)
        got: list[Entry] = []
        for i in range(20):
            await redis_client.xadd("s1", {"type": "chunk", "content": f"e{i}"})
            got.extend(await take(fast, 1))  # never held back by the one that does not read
        assert contents(got) == [f"e{i}" for i in range(20)]
        assert slow.closed is Reason.OVERFLOW
        with pytest.raises(Closed) as closed:
            await slow.next(1)
        assert closed.value.reason is Reason.OVERFLOW


async def test_killed_hub_connections_are_replaced_without_gap_or_duplicate(
    hub: StreamHub, redis_client: aioredis.Redis, redis_url: str
) -> None:
    keys = ["s1", "s2", "s3"]
    listeners = {key: [hub.subscribe(key, ZERO) for _ in range(3)] for key in keys}
    writer = aioredis.Redis.from_url(redis_url)  # killed too: it retries, Redis is the reference

    async def write() -> None:
        for i in range(200):
            for key in keys:
                while True:
                    try:
                        await writer.xadd(key, {"type": "chunk", "content": f"e{i}"})
                        break
                    except RedisConnectionError:
                        continue
            if i % 5 == 0:
                await asyncio.sleep(0.005)

    writing = asyncio.create_task(write())
    kills = 0
    while not writing.done():
        await asyncio.sleep(0.05)
        hub_conns = await hub_clients(redis_client)
        if kills % 2 == 0 and hub_conns:
            kills += await redis_client.client_kill_filter(_id=hub_conns[0]["id"])
        else:  # every normal client at once: the hub's and the pool's
            kills += min(1, await redis_client.client_kill_filter(_type="normal", skipme=True))
    await writing
    await writer.aclose()
    assert kills >= 4
    for key in keys:
        stored: Any = await redis_client.xrange(key)
        expected = [fields[b"content"].decode() for _, fields in stored]
        for listener in listeners[key]:
            assert contents(await take(listener, len(expected), timeout_s=30)) == expected

    async def replaced() -> bool:
        return len(await hub_clients(redis_client)) == 2  # replaced, not multiplied

    await wait_for(replaced)


async def test_connections_killed_one_after_another_while_redis_answers_end_no_listener(
    hub: StreamHub, redis_client: aioredis.Redis
) -> None:
    # Each kill lands in the blocked read of a fresh connection, with nothing written between:
    # two failed rounds in a row, though Redis answered every connection. Only a round that
    # cannot reach Redis after a failure is Redis down (test_stream_faults.py covers that).
    listener = hub.subscribe("s1", ZERO)
    await add(redis_client, "s1", 1, prefix="before")
    assert contents(await take(listener, 1)) == ["before0"]
    killed: set[int] = set()

    async def blocked_on_a_new_connection() -> bool:
        listed = [c for c in await hub_clients(redis_client) if int(c["id"]) not in killed]
        return bool(listed) and listed[0]["cmd"] == "xread"

    for _ in range(3):
        await wait_for(blocked_on_a_new_connection)
        [conn] = [c for c in await hub_clients(redis_client) if int(c["id"]) not in killed]
        killed.add(int(conn["id"]))
        assert await redis_client.client_kill_filter(_id=conn["id"]) == 1
    await add(redis_client, "s1", 2, prefix="after")
    assert contents(await take(listener, 2)) == ["after0", "after1"]


async def test_a_thousand_listeners_share_the_fixed_connections(
    fast_gone_check: None, make_settings: Callable[..., Settings]
) -> None:
    with EmbeddedRedis() as own:  # its own server: every client listed is the hub's or this test's
        writer = aioredis.Redis.from_url(own.url, client_name="test-writer")
        async with running_hub(make_settings(redis_url=own.url)) as hub:
            keys = [f"s{i}" for i in range(10)]
            listeners = [hub.subscribe(keys[i % 10], ZERO) for i in range(1000)]
            for key in keys:
                await add(writer, key, 5)
            for listener in listeners:
                assert contents(await take(listener, 5)) == [f"e{i}" for i in range(5)]
            await asyncio.sleep(4 * FAST_GONE_CHECK_S)  # a check for vanished keys has used the pool too
            listed: Any = await writer.client_list()
            names = [c["name"] for c in listed if c["name"] != "test-writer"]
            assert names.count(readers.HUB_CLIENT_NAME) == hub_module.READERS == 2
            assert len(names) <= 2 + 2  # the hub's two, and the pool's one or two
        await writer.aclose()


async def test_vanished_and_replaced_keys_close_their_listeners(
    fast_gone_check: None, hub: StreamHub, redis_client: aioredis.Redis
) -> None:
    gone, replaced, kept = (
        hub.subscribe("gone", ZERO),
        hub.subscribe("replaced", ZERO),
        hub.subscribe("kept", ZERO),
    )
    for key in ("gone", "replaced", "kept"):
        await add(redis_client, key, 1)
    for listener in (gone, replaced, kept):
        await take(listener, 1)
    await redis_client.delete("gone")  # expiry or a stop: XREAD alone would never tell
    await redis_client.set("tmp", "a string")
    await redis_client.rename("tmp", "replaced")  # WRONGTYPE for any read naming it
    for listener in (gone, replaced):
        with pytest.raises(Closed) as closed:
            await asyncio.wait_for(listener.next(None), 15)
        assert closed.value.reason is Reason.GONE
    await add(redis_client, "kept", 2, "k")
    assert contents(await take(kept, 2)) == ["k0", "k1"]


async def test_an_unseen_stream_lives_while_its_status_key_does(
    fast_gone_check: None, hub: StreamHub, redis_client: aioredis.Redis
) -> None:
    await redis_client.set("status", "queued")
    waiting = hub.subscribe("later", ZERO, alive_key="status")
    orphan = hub.subscribe("never", ZERO, alive_key="no-status")
    with pytest.raises(Closed):
        await asyncio.wait_for(orphan.next(None), 15)
    await asyncio.sleep(0.5)  # two more checks: the one with a status key lives on
    await add(redis_client, "later", 1)
    assert contents(await take(waiting, 1)) == ["e0"]


async def test_follow_hands_over_when_the_hub_is_ahead(hub: StreamHub, redis_client: aioredis.Redis) -> None:
    """The replay ended at e2, but the hub had already read up to e5 for another listener:
    the tail read after subscribing fills e3..e5, the hub brings e6 on, each exactly once."""
    ahead = hub.subscribe("s1", ZERO)
    ids = await add(redis_client, "s1", 6)
    await take(ahead, 6)
    position = parse_id(ids[2])
    assert position is not None
    follower = Follower(hub, "s1", position, [], timeout_s=1)
    try:
        assert [contents(page) async for page in follower.catch_up()] == [["e3", "e4", "e5"]]
        await add(redis_client, "s1", 1, "n")
        assert contents(await follower.listener.next(10)) == ["n0"]
        await add(redis_client, "s1", 1, "m")  # then an `end`, and an entry after it, never handed out
        await redis_client.xadd("s1", {"type": "end", "status": "completed"})
        await add(redis_client, "s1", 1, "after-the-end")
        got: list[Entry] = []
        while not is_end(got):
            got += through_end(await follower.listener.next(10))
        assert [e.type for e in got] == ["chunk", "end"]
    finally:
        follower.close()
    assert hub.followed == 1  # `ahead` still listens; the follower left


async def test_redis_down_closes_listeners_with_an_error(make_settings: Callable[..., Settings]) -> None:
    with EmbeddedRedis() as own:
        async with running_hub(make_settings(redis_url=own.url, redis_timeout_ms=300)) as hub:
            listener = hub.subscribe("s1", ZERO)
            writer = aioredis.Redis.from_url(own.url)
            await add(writer, "s1", 1)
            await take(listener, 1)
            await writer.aclose()
            own.stop()
            with pytest.raises(Closed) as closed:
                await asyncio.wait_for(listener.next(None), 20)
            assert closed.value.reason is Reason.ERROR


async def test_cluster_polls_every_node_on_bounded_connections(
    make_settings: Callable[..., Settings],
) -> None:
    redis_cli = cli_beside(find_server_binary())
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    nodes = [EmbeddedRedis(free_port(below=55536), extra_args=args).start() for _ in range(3)]
    try:
        subprocess.run(  # noqa: ASYNC221 - a one-off set-up step
            [redis_cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        writer = RedisCluster.from_url(nodes[0].url)
        await wait_for(cluster_ok(writer), timeout_s=10)
        keys = [f"chat:stream:c:run-{i}" for i in range(12)]  # slots on every node
        async with running_hub(make_settings(redis_url=nodes[1].url, redis_cluster=True)) as hub:
            listeners = [hub.subscribe(keys[i % 12], ZERO) for i in range(300)]
            for key in keys:
                await add(writer, key, 3)
            for listener in listeners:
                assert contents(await take(listener, 3)) == ["e0", "e1", "e2"]
            for node in nodes:
                direct = aioredis.Redis.from_url(node.url)
                listed: Any = await direct.client_list()
                await direct.aclose()
                assert len(listed) <= 4, listed  # the pool's one or two, the writer's, this one
        await writer.aclose()
    finally:
        for node in nodes:
            node.close()


async def test_behind_sentinel(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub's own connections find the master through Sentinel as the pool does, and
    its joins still interrupt the block (CLIENT UNBLOCK reaches the master too)."""
    monkeypatch.setattr(readers, "BLOCK_MS", 60_000)
    redis_server = find_server_binary()
    assert redis_server
    with EmbeddedRedis() as master, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        conf = Path(tmp) / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp}\nsentinel monitor m 127.0.0.1 {master.port} 1\n"
        )
        sentinel = subprocess.Popen([redis_server, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)  # noqa: ASYNC220
        try:
            probe = aioredis.Redis(port=port)

            async def sentinel_knows_master() -> bool:
                with contextlib.suppress(Exception):
                    return bool(await probe.execute_command("SENTINEL", "get-master-addr-by-name", "m"))  # type: ignore[no-untyped-call]
                return False

            await wait_for(sentinel_knows_master, timeout_s=10)
            await probe.aclose()
            settings = make_settings(
                redis_url="redis://127.0.0.1:1/0",
                redis_sentinels=f"127.0.0.1:{port}",
                redis_sentinel_master="m",
            )
            writer = aioredis.Redis.from_url(master.url)
            async with running_hub(settings) as hub:
                first = hub.subscribe("s1", ZERO)
                await add(writer, "s1", 2)
                assert contents(await take(first, 2)) == ["e0", "e1"]
                joined = hub.subscribe("s2", ZERO)
                await add(writer, "s2", 1)
                assert contents(await take(joined, 1, timeout_s=20)) == ["e0"]
                assert len(await hub_clients(writer)) == 2
            await writer.aclose()
        finally:
            sentinel.terminate()
            sentinel.wait(5)
