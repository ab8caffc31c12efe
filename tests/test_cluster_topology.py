"""Redis Cluster topology changes for real: three primaries with a replica each on loopback,
runs written through the simulator, both endpoints and a watch polled steadily and one run
followed through `events`, while a slot holding the live run's keys moves to another primary
(SETSLOT IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE) and while a primary fails over (`CLUSTER
FAILOVER` on its replica, then a primary killed). Every answer is right or a 503, right again
within the README's bound; the follower gets every entry once; the live index subscribes to
exactly the new primaries. With SIDECAR_READ_FROM_REPLICAS, the facts come from replicas."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from session_sidecar.index import LiveIndex
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import auth
from tests.steady import Follower, LiveWriter, Poller
from tests.streaming import Served, serve
from tests.test_index import Seeds
from tests.topology import Cluster, calls, command, kill, pubsub_clients, until

# README, "Sentinel, Cluster, and every core": once the cluster has a primary for every slot again, right
# answers within this; a migration interrupts nothing.
RECOVERY_BOUND_S = 5.0
CONV = "conv-cluster"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    setup = Cluster().start()
    try:
        yield setup
    finally:
        setup.close()


@pytest.fixture
async def writer(cluster: Cluster) -> AsyncIterator[BackendSimulator]:
    await cluster.settled()
    client = RedisCluster.from_url(cluster.url, socket_timeout=1, socket_connect_timeout=1)
    await client.flushall()
    yield BackendSimulator(client)  # type: ignore[arg-type]
    await client.aclose()


def settings_for(cluster: Cluster, make_settings: Callable[..., Settings], **fields: Any) -> Settings:
    return make_settings(redis_url=cluster.url, redis_cluster=True, index_mode="index", **fields)


def index_of(served: Served) -> LiveIndex:
    index = served.sidecar.index
    assert isinstance(index, LiveIndex)
    return index


async def get(served: Served, conversation: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(served.path(conversation, "active-session"), headers=auth("alice"))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@dataclass
class Measured:
    change_s: float  # the change itself, as the test drove it
    recovery_s: float  # from the start of the change to right answers for good
    unavailable: int  # 503s meanwhile


async def subscribed_on_primaries(cluster: Cluster) -> bool:
    primaries = await cluster.primaries()
    for node in cluster.nodes:
        if node.running and await pubsub_clients(node.port) != (1 if node.port in primaries else 0):
            return False
    return True


async def under_polling(
    cluster: Cluster,
    writer: BackendSimulator,
    served: Served,
    change: Callable[[str], Awaitable[None]],
    *,
    lost: bool = False,
) -> Measured:
    """Poll and follow a live run, `change(its stream key)`, then check every answer, the
    follower, and that the index follows the primaries there are now."""
    index = index_of(served)
    await until(lambda: index.in_sync, 10, "index in sync")
    start = int(time.time() * 1000) - 60_000
    await writer.full_run(CONV, "alice", "older", chunks=2, start_ms=start)
    live = await writer.full_run(CONV, "alice", "live", chunks=1, status=None)
    await until(lambda: subscribed_on_primaries(cluster), 10, "the index subscribed on every primary")
    follower = Follower(served, CONV, live).start()
    live_writer = LiveWriter(writer, CONV, live).start()
    poller = Poller(served, CONV, live).start()
    try:
        await poller.until_steady(time.monotonic(), hold_s=1.0, timeout_s=10)
        began = time.monotonic()
        await change(writer.stream_key(CONV, live))
        changed = time.monotonic() - began
        recovery = await poller.until_steady(began, hold_s=2.0)
        assert not poller.wrong(), poller.summary()
        await live_writer.stop()
        entries: Any = await writer.client.xrange(writer.stream_key(CONV, live))
        await follower.check([entry_id.decode() for entry_id, _ in entries], lost=lost)
    finally:
        await poller.stop()
        await live_writer.stop()
        await follower.stop()
    await until(lambda: subscribed_on_primaries(cluster), 20, "the index subscribed on exactly the primaries")
    await until(lambda: index.in_sync, 20, "index in sync")
    assert live in index.find(CONV).run_ids
    # Runs created now, in slots of every primary, are found through the index, not a SCAN.
    fresh = [await writer.full_run(f"conv-after-{i}", "alice", "m", chunks=1, status=None) for i in range(6)]
    await until(
        lambda: all(run in index.find(f"conv-after-{i}").run_ids for i, run in enumerate(fresh)),
        10,
        "new runs indexed",
    )
    seeds = Seeds(index)
    for i, run in enumerate(fresh):
        assert (await get(served, f"conv-after-{i}"))["sessionId"] == run
    assert index.in_sync and seeds.count == 0, "answered from the index, no re-seed between"
    return Measured(changed, recovery, len(poller.unavailable()))


async def test_slot_migrated_mid_run(
    cluster: Cluster, writer: BackendSimulator, make_settings: Callable[..., Settings]
) -> None:
    # A run that ended: no write will re-announce its keys after they moved.
    done = await writer.full_run("conv-done", "alice", "m", chunks=1, start_ms=int(time.time() * 1000) - 9000)

    async def move(key: str, pause_s: float) -> None:
        slot = key_slot(key.encode())
        owner = await cluster.slot_owner(slot)
        target = next(port for port in await cluster.primaries() if port != owner)
        await cluster.migrate(slot, target, pause_s)
        assert await cluster.slot_owner(slot) == target

    async def migrate(stream_key: str) -> None:
        # The live run's stream and status keys (each in a slot of its own) move to other primaries.
        await move(stream_key, pause_s=0.5)
        await move(stream_key.replace("chat:stream:", "task:status:", 1), pause_s=0.5)
        await move(writer.stream_key("conv-done", done), pause_s=0)
        await move(writer.status_key("conv-done", done), pause_s=0)

    with serve(settings_for(cluster, make_settings)) as served:
        measured = await under_polling(cluster, writer, served, migrate)
        # The target announced the keys (`new`) as the source dropped them (`del`), in either order.
        assert done in index_of(served).find("conv-done").run_ids
        assert (await get(served, "conv-done"))["sessionId"] == done
    print(f"slot migration: {measured}")
    assert measured.recovery_s <= RECOVERY_BOUND_S


async def test_cluster_failover_command(
    cluster: Cluster, writer: BackendSimulator, make_settings: Callable[..., Settings]
) -> None:
    async def failover(stream_key: str) -> None:
        owner = await cluster.slot_owner(key_slot(stream_key.encode()))
        replica = await cluster.replica_of(owner)
        assert await command(replica, "CLUSTER", "FAILOVER") == b"OK"
        await until(lambda: _owned_by(cluster, stream_key, replica), 20, "the replica took over")

    with serve(settings_for(cluster, make_settings)) as served:
        measured = await under_polling(cluster, writer, served, failover)
    print(f"CLUSTER FAILOVER: {measured}")
    assert measured.recovery_s <= RECOVERY_BOUND_S


async def test_cluster_primary_killed(
    cluster: Cluster, writer: BackendSimulator, make_settings: Callable[..., Settings]
) -> None:
    killed: list[int] = []

    async def kill_owner(stream_key: str) -> None:
        owner = await cluster.slot_owner(key_slot(stream_key.encode()))
        replica = await cluster.replica_of(owner)
        await kill(owner)
        killed.append(owner)
        await until(lambda: _owned_by(cluster, stream_key, replica), 30, "the replica took over")

    try:
        with serve(settings_for(cluster, make_settings)) as served:
            measured = await under_polling(cluster, writer, served, kill_owner, lost=True)
    finally:
        for port in killed:  # back, as a replica of the new primary, for the next test
            cluster.node(port).stop()
            cluster.node(port).start()
    print(f"primary killed: {measured}")
    # The outage includes the cluster's own failure detection and election (about 2 s here).
    assert measured.recovery_s - measured.change_s <= RECOVERY_BOUND_S


async def test_cluster_refusals_are_a_503_never_a_404(
    cluster: Cluster, writer: BackendSimulator, make_settings: Callable[..., Settings]
) -> None:
    """CLUSTERDOWN (here: a slot no primary serves) says nothing about the keys: taken for
    "no such key", the run would vanish from the answers."""
    live = await writer.full_run(CONV, "alice", "live", chunks=1, status=None)
    slot = key_slot(writer.stream_key(CONV, live).encode())
    owner = await cluster.slot_owner(slot)
    with serve(settings_for(cluster, make_settings)) as served:
        await until(lambda: index_of(served).in_sync, 10, "index in sync")
        assert (await get(served, CONV))["sessionId"] == live
        follower = Follower(served, CONV, live).start()  # the hub polls the stream meanwhile
        await until(lambda: len(follower.ids) == 3, 10, "the follower has the run so far")
        await command(owner, "CLUSTER", "DELSLOTS", slot)
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                for tail in ("active-session", "task-status", f"events?run_id={live}", f"resume/{live}"):
                    method = "POST" if tail.startswith("resume") else "GET"
                    response = await http.request(method, served.path(CONV, tail), headers=auth("alice"))
                    assert response.status_code == 503, (tail, response.status_code, response.text)
            await asyncio.sleep(1)  # the hub meets the refusal too: its reader must survive it
        finally:
            await command(owner, "CLUSTER", "ADDSLOTS", slot)
        await until(lambda: _answers(served, CONV, live), 10, "answers again")
        for i in range(3):
            await writer.chunk(CONV, live, f"after {i}")
        entries: Any = await writer.client.xrange(writer.stream_key(CONV, live))
        await follower.check([entry_id.decode() for entry_id, _ in entries])
        await follower.stop()


async def test_cluster_reads_from_replicas(
    cluster: Cluster, writer: BackendSimulator, make_settings: Callable[..., Settings]
) -> None:
    primaries = await cluster.settled()
    runs = [await writer.full_run(f"conv-r{i}", "alice", "m", chunks=1, status=None) for i in range(6)]
    replicas = [await cluster.replica_of(port) for port in primaries]
    reads = ("xinfo|stream", "get")
    before = {port: await calls(port, *reads) for port in primaries + replicas}
    with serve(settings_for(cluster, make_settings, read_from_replicas=True)) as served:
        await until(lambda: index_of(served).in_sync, 10, "index in sync")
        for i, run in enumerate(runs):
            await until(functools.partial(_answers, served, f"conv-r{i}", run), 10, "replicas caught up")
    after = {port: await calls(port, *reads) for port in primaries + replicas}
    assert sum(after[port] - before[port] for port in replicas) >= len(runs) * 2
    assert all(after[port] == before[port] for port in primaries), "no fact read on a primary"


async def _answers(served: Served, conversation: str, run_id: str) -> bool:
    return bool((await get(served, conversation))["sessionId"] == run_id)


async def _owned_by(cluster: Cluster, key: str, port: int) -> bool:
    return await cluster.slot_owner(key_slot(key.encode())) == port
