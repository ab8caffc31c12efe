"""A 3-primary Redis Cluster on loopback for `python -m bench.run --cluster`.

The same binary and settings as the single server (`bench.harness.RedisServer`): the
project's EmbeddedRedis, keyspace notifications on, no persistence; three primaries, no
replicas (replicas would only add replication work for the fill, none for the reads
measured). `SummedInfo` gives the harness one `INFO` over all three, summed, so the
per-request Redis figures are the Cluster's as a whole.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import redis

from bench.common import NOTIFY_KEYSPACE_EVENTS
from session_sidecar.embedded import EmbeddedRedis, find_cli_binary, free_port

PRIMARIES = 3
ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")


class ClusterRedis:
    def __init__(self) -> None:
        # A cluster node also listens on port + 10000 (the cluster bus).
        self._nodes = [
            EmbeddedRedis(free_port(below=55536), notify_flags=NOTIFY_KEYSPACE_EVENTS, extra_args=ARGS)
            for _ in range(PRIMARIES)
        ]
        self.binary = self._nodes[0].binary or "?"

    def start(self) -> str:
        """The URL of one node (a seed for the Cluster clients), once every slot is served."""
        for node in self._nodes:
            node.start()
        cli = find_cli_binary(self.binary)
        if cli is None:
            raise RuntimeError("no redis-cli to create the Cluster (Debian: redis-tools)")
        subprocess.run(
            [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self._nodes],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(_state(node.port) == "ok" for node in self._nodes):
                return self._nodes[0].url
            time.sleep(0.1)
        raise RuntimeError("the Cluster did not reach cluster_state:ok in 30 s")

    def info_client(self) -> SummedInfo:
        return SummedInfo([redis.Redis(port=node.port, socket_timeout=60) for node in self._nodes])

    def stop(self) -> None:
        for node in self._nodes:
            node.close()


class SummedInfo:
    """`info(section)` over every primary, summed: what bench.run reads of one server."""

    def __init__(self, nodes: list[redis.Redis]):
        self._nodes = nodes

    def info(self, section: str) -> Any:
        if section == "server":
            return self._nodes[0].info("server")
        # One INFO per node for every section, so the harness's own calls are known exactly.
        every: list[dict[str, Any]] = [node.info("all") for node in self._nodes]
        if section == "cpu":
            return {k: sum(float(i[k]) for i in every) for k in ("used_cpu_user", "used_cpu_sys")}
        if section == "stats":
            # The INFO commands of this harness do not count: a quiet Cluster stays at 0.
            own = sum(int(i.get("cmdstat_info", {}).get("calls", 0)) for i in every)
            return {"total_commands_processed": sum(int(i["total_commands_processed"]) for i in every) - own}
        if section == "commandstats":
            summed: dict[str, dict[str, int]] = {}
            for info in every:
                for key, value in info.items():
                    if key.startswith("cmdstat_") and isinstance(value, dict):
                        entry = summed.setdefault(key, {"calls": 0, "usec": 0})
                        entry["calls"] += int(value["calls"])
                        entry["usec"] += int(value["usec"])
            return summed
        raise ValueError(f"no summed INFO {section!r}")

    def close(self) -> None:
        for node in self._nodes:
            node.close()


def _state(port: int) -> str:
    try:
        with redis.Redis(port=port, socket_timeout=2) as node:
            info: Any = node.cluster("INFO")
    except redis.RedisError:
        return "down"
    return str(info.get("cluster_state", "?"))
