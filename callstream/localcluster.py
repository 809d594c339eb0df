"""A local Apache Kafka cluster (KRaft) of several nodes without Docker, for development and tests.

Every node is a `LocalKafka` (broker and controller in one JVM) with a data folder and ports of its
own; together they are the controller quorum (three nodes: three voters, so one may be lost) and
share one cluster id. Internal topics and topics the brokers create themselves get the replication
that callstream gives its own topics (`kernel.topics.Replication`): on three or more nodes three
replicas, two of which must hold a write.

`callstream kafka start --brokers 3` puts the nodes on one host, on consecutive port pairs (9092
and 9093 for the first, 9094 and 9095 for the next, ...), unless CALLSTREAM_KAFKA_BOOTSTRAP lists as
many servers, whose ports are taken then. It writes `cluster-<first port>.json` into the Kafka home,
so that `stop` and `status` find every node. The tests give each node a host of its own (a network
namespace) with `on_hosts`.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from callstream.localkafka import (
    KAFKA_VERSION,
    LocalKafka,
    LocalKafkaSettings,
    broker_answers,
    new_cluster_id,
    port_open,
)
from kernel.errors import KafkaSetupError
from kernel.topics import AUTO

log = logging.getLogger(__name__)
# A node that is down is said by `status`; librdkafka's line per failed connection would drown it.
_librdkafka = logging.getLogger("callstream.localcluster.librdkafka")
_librdkafka.setLevel(logging.CRITICAL)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Host:
    """Where a node runs: its address, and the command prefix that puts a process there."""

    address: str
    wrapper: tuple[str, ...] = ()


def brokers_seen(bootstrap: str, timeout: float = 3.0) -> int:
    """How many brokers the cluster's metadata shows (registered and not fenced); 0 when none answers."""
    servers = [s.rpartition(":") for s in bootstrap.split(",")]
    if not any(port_open(host, int(port)) for host, _, port in servers):
        return 0  # and librdkafka prints no connection failures
    conf: dict[str, str | int | float | bool] = {
        "bootstrap.servers": bootstrap,
        "socket.timeout.ms": int(timeout * 1000),
    }
    admin = AdminClient(conf, error_cb=lambda _err: None, logger=_librdkafka)
    try:
        return len(admin.list_topics(timeout=timeout).brokers)
    except Exception:
        return 0


@dataclass
class LocalCluster:
    """Several `LocalKafka` nodes that form one KRaft cluster."""

    nodes: list[LocalKafka]

    @classmethod
    def on_ports(
        cls,
        home: Path,
        brokers: int,
        host: str = "127.0.0.1",
        ports: Sequence[int] = (),
        controller_ports: Sequence[int] = (),
        **node: Any,
    ) -> LocalCluster:
        """`brokers` nodes on one host: at `ports` (each with its controller on the next port unless
        `controller_ports` says), or at 9092, 9094, ... when `ports` is the first port alone."""
        if len(ports) != brokers:
            first = ports[0] if ports else 9092
            ports = [first + 2 * i for i in range(brokers)]
        controllers = controller_ports if len(controller_ports) == brokers else [p + 1 for p in ports]
        return cls._make(home, [(Host(host), p, c) for p, c in zip(ports, controllers, strict=True)], node)

    @classmethod
    def on_hosts(
        cls, home: Path, hosts: Sequence[Host], port: int = 9092, controller_port: int = 9093, **node: Any
    ) -> LocalCluster:
        """One node per host, every one on the same ports."""
        return cls._make(home, [(h, port, controller_port) for h in hosts], node)

    @classmethod
    def _make(cls, home: Path, places: list[tuple[Host, int, int]], node: dict[str, Any]) -> LocalCluster:
        voters = ",".join(f"{i}@{h.address}:{c}" for i, (h, _, c) in enumerate(places, start=1))
        # On one host each node's folder is named by its port, as a single broker's is.
        by_port = len({port for _, port, _ in places}) == len(places)
        replication, min_insync = AUTO.resolve(len(places))
        nodes = [
            LocalKafka(
                home=home,
                host=h.address,
                port=port,
                controller_port=controller,
                node_id=i,
                voters=voters,
                replication=replication,
                min_insync=min_insync,
                name=None if by_port else f"node-{i}",
                wrapper=h.wrapper,
                **node,
            )
            for i, (h, port, controller) in enumerate(places, start=1)
        ]
        return cls(nodes)

    @classmethod
    def load(cls, manifest: Path, jars: Path | None = None, version: str = KAFKA_VERSION) -> LocalCluster:
        """The cluster a `start` recorded in `manifest`."""
        data = json.loads(manifest.read_text())
        places = [(Host(n["host"]), int(n["port"]), int(n["controller_port"])) for n in data["nodes"]]
        cluster = cls._make(manifest.parent, places, {"jars": jars, "version": version})
        for node in cluster.nodes:
            node.cluster_id = data.get("cluster_id")
        return cluster

    @property
    def bootstrap(self) -> str:
        """Every node, as CALLSTREAM_KAFKA_BOOTSTRAP lists them."""
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def manifest(self) -> Path:
        return self.nodes[0].home / f"cluster-{self.nodes[0].port}.json"

    def node(self, node_id: int) -> LocalKafka:
        return self.nodes[node_id - 1]

    # -- lifecycle ---------------------------------------------------------------------------

    def _cluster_id(self) -> str:
        """The id the formatted nodes share, or a new one when none is formatted yet."""
        found = {cid for n in self.nodes if (cid := n.formatted_cluster_id()) is not None}
        if len(found) > 1:
            folders = ", ".join(str(n.state) for n in self.nodes)
            raise KafkaSetupError(
                f"the nodes' data folders belong to different clusters ({', '.join(sorted(found))}); "
                f"remove {folders} to start afresh"
            )
        return found.pop() if found else (self.nodes[0].cluster_id or new_cluster_id())

    def _record(self, cluster_id: str) -> None:
        nodes = [{"host": n.host, "port": n.port, "controller_port": n.controller_port} for n in self.nodes]
        self.manifest.parent.mkdir(parents=True, exist_ok=True)
        self.manifest.write_text(json.dumps({"cluster_id": cluster_id, "nodes": nodes}, indent=2) + "\n")

    def start(self, wait: float = 120.0, say: Say = log.info) -> float:
        """Start every node that does not answer, and wait until the metadata shows all of them."""
        started = time.monotonic()
        if self.running():
            say(f"The Kafka cluster is already running: {self.bootstrap}.")
            return 0.0
        self.nodes[0].fetch(say)
        cluster_id = self._cluster_id()
        self._record(cluster_id)
        procs: dict[int, subprocess.Popen[bytes]] = {}
        for node in self.nodes:
            node.cluster_id = cluster_id
            if node.pid() is None and not node.running():
                procs[node.node_id] = node.launch(say)
        version = self.nodes[0].version
        say(f"Starting {len(procs)} of {len(self.nodes)} Kafka {version} nodes; waiting for the quorum ...")
        self._wait_all(procs, started + wait)
        took = time.monotonic() - started
        say(f"The Kafka cluster is ready after {took:.1f}s: CALLSTREAM_KAFKA_BOOTSTRAP={self.bootstrap}")
        return took

    def _wait_all(self, procs: dict[int, subprocess.Popen[bytes]], deadline: float) -> None:
        while time.monotonic() < deadline:
            for node_id, proc in procs.items():
                failed = self.node(node_id).exited(proc)
                if failed is not None:
                    self.stop()
                    raise failed
            if self.running():
                return
            time.sleep(0.5)
        self.stop()
        logs = ", ".join(str(n.log_dir / "server.log") for n in self.nodes)
        raise KafkaSetupError(f"the Kafka cluster did not form within the wait; see {logs}")

    def running(self) -> bool:
        """True when every node answers and the metadata shows them all."""
        return all(broker_answers(n.bootstrap, timeout=1.0) for n in self.nodes) and brokers_seen(
            self.bootstrap
        ) == len(self.nodes)

    def stop(self, timeout: float = 30.0, say: Say = log.info) -> bool:
        """Stop every node this home started, all at once (one by one, the last would wait for a
        quorum that is gone); True if one was running."""
        pids = {n.node_id: n.send_signal(signal.SIGTERM) for n in self.nodes}
        running = {i: pid for i, pid in pids.items() if pid is not None}
        if not running:
            say(f"No node of the cluster {self.bootstrap} started from {self.nodes[0].home} is running.")
            return False
        say(f"Stopping {len(running)} Kafka nodes ...")
        deadline = time.monotonic() + timeout
        for node_id, pid in running.items():
            self.node(node_id).wait_gone(pid, max(1.0, deadline - time.monotonic()), say)
        say("The Kafka cluster stopped.")
        return True

    def status(self) -> str:
        """One line per node, then one for the cluster."""
        lines = [f"node {n.node_id}: {n.status()}" for n in self.nodes]
        seen = brokers_seen(self.bootstrap)
        lines.append(f"The metadata shows {seen} of {len(self.nodes)} brokers; bootstrap {self.bootstrap}")
        return "\n".join(lines)


def configured(
    brokers: int | None = None, port: int | None = None, home: Path | None = None
) -> LocalKafka | LocalCluster:
    """What `callstream kafka` acts on: the cluster that `start` recorded in the home for this port,
    a cluster of `brokers` (or of as many nodes as CALLSTREAM_KAFKA_BOOTSTRAP lists), else one broker."""
    cfg = LocalKafkaSettings()
    home = (home or cfg.kafka_home).resolve()
    servers = [(h, int(p)) for h, _, p in (s.strip().rpartition(":") for s in cfg.kafka_bootstrap.split(","))]
    recorded = home / f"cluster-{port or servers[0][1]}.json"
    node: dict[str, Any] = {"jars": cfg.jars(home), "version": cfg.kafka_version}
    if brokers is None and recorded.exists():
        return LocalCluster.load(recorded, **node)
    count = brokers or len(servers)
    if count == 1:
        return LocalKafka.configured(port=port, home=home)
    if count == len(servers) and port is None:  # a node on each server the bootstrap lists
        if len(set(servers)) < count:
            raise KafkaSetupError(f"CALLSTREAM_KAFKA_BOOTSTRAP lists a server twice: {cfg.kafka_bootstrap}")
        return LocalCluster._make(home, [(Host(h), p, p + 1) for h, p in servers], node)
    return LocalCluster.on_ports(home, count, servers[0][0], [port or servers[0][1]], **node)
