"""`callstream kafka start --brokers 3`: three KRaft nodes that form one cluster, and `stop`/`status`
that cover all of them."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from callstream.localcluster import LocalCluster, brokers_seen, configured
from callstream.localkafka import LocalKafka, free_port
from kernel.errors import KafkaSetupError
from kernel.topics import ensure_topics, topic_configs
from tests.support.paths import KAFKA_JARS


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("CALLSTREAM_"):
            monkeypatch.delenv(name)
    return tmp_path


def _properties(node: LocalKafka) -> dict[str, str]:
    text = node._write_config().read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_three_nodes_on_one_host_take_port_pairs_and_share_one_quorum(workdir: Path) -> None:
    cluster = configured(brokers=3, home=workdir / "k")
    assert isinstance(cluster, LocalCluster)
    assert cluster.bootstrap == "127.0.0.1:9092,127.0.0.1:9094,127.0.0.1:9096"
    props = [_properties(n) for n in cluster.nodes]
    assert [p["node.id"] for p in props] == ["1", "2", "3"]
    assert {p["controller.quorum.voters"] for p in props} == {"1@127.0.0.1:9093,2@127.0.0.1:9095,3@127.0.0.1:9097"}
    assert [p["listeners"] for p in props][2] == "PLAINTEXT://127.0.0.1:9096,CONTROLLER://127.0.0.1:9097"
    assert len({p["log.dirs"] for p in props}) == 3, "each node has a data folder of its own"
    for key in (
        "default.replication.factor",
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
    ):
        assert {p[key] for p in props} == {"3"}, key
    assert {p["min.insync.replicas"] for p in props} == {"2"}


def test_one_broker_stays_the_single_broker_it_was(workdir: Path) -> None:
    single = configured(home=workdir / "k")
    assert isinstance(single, LocalKafka) and single.state == workdir / "k" / "broker-9092"
    props = _properties(single)
    assert props["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert (props["default.replication.factor"], props["min.insync.replicas"]) == ("1", "1")


def test_the_bootstrap_list_gives_the_nodes_and_a_started_cluster_is_found_again(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:19092,127.0.0.1:19192,127.0.0.1:19292")
    cluster = configured(home=workdir / "k")
    assert isinstance(cluster, LocalCluster)
    assert [(n.port, n.controller_port) for n in cluster.nodes] == [(19092, 19093), (19192, 19193), (19292, 19293)]
    cluster._record("cid")
    monkeypatch.setenv("CALLSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
    found = configured(home=workdir / "k")  # what `stop` and `status` see with only the first node named
    assert isinstance(found, LocalCluster) and found.bootstrap == cluster.bootstrap
    assert {n.cluster_id for n in found.nodes} == {"cid"}


def test_a_node_on_each_host_the_bootstrap_names_and_a_server_named_twice_is_refused(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CALLSTREAM_KAFKA_BOOTSTRAP", "10.0.0.1:9092,10.0.0.2:9092,10.0.0.3:9092")
    cluster = configured(home=workdir / "k")
    assert isinstance(cluster, LocalCluster)
    assert [n.state.name for n in cluster.nodes] == ["node-1", "node-2", "node-3"]
    assert _properties(cluster.nodes[1])["controller.quorum.voters"] == (
        "1@10.0.0.1:9093,2@10.0.0.2:9093,3@10.0.0.3:9093"
    )
    monkeypatch.setenv("CALLSTREAM_KAFKA_BOOTSTRAP", "10.0.0.1:9092,10.0.0.1:9092")
    with pytest.raises(KafkaSetupError, match="lists a server twice"):
        configured(home=workdir / "k")


def _cli(*args: str, home: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CALLSTREAM_KAFKA_HOME": str(home),
        "CALLSTREAM_KAFKA_CACHE": str(KAFKA_JARS),
        "CALLSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
    }
    return subprocess.run(
        [sys.executable, "-m", "callstream", "kafka", *args], env=env, capture_output=True, text=True, timeout=300
    )


def _free_block(width: int = 6) -> int:
    """A port p with p .. p+width-1 all free on loopback (three nodes, a broker and a controller port each)."""
    for _ in range(100):
        first = free_port()
        if first + width > 65535:
            continue
        with contextlib.ExitStack() as held:
            try:
                for q in range(first, first + width):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", q))
            except OSError:
                continue
        return first
    raise AssertionError("no block of free loopback ports")


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.cluster
def test_kafka_start_brokers_3_then_status_and_stop_cover_every_node(tmp_path: Path) -> None:
    port = _free_block()
    started = _cli("start", "--brokers", "3", home=tmp_path, port=port)
    assert started.returncode == 0, started.stderr + started.stdout
    bootstrap = f"127.0.0.1:{port},127.0.0.1:{port + 2},127.0.0.1:{port + 4}"
    assert f"CALLSTREAM_KAFKA_BOOTSTRAP={bootstrap}" in started.stdout
    try:
        assert brokers_seen(bootstrap) == 3
        status = _cli("status", home=tmp_path, port=port)
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("Kafka is running") == 3 and "3 of 3 brokers" in status.stdout
        ensure_topics(bootstrap, "rf")
        admin = AdminClient({"bootstrap.servers": bootstrap})
        parts = admin.list_topics("rf.call_analyzed", timeout=10).topics["rf.call_analyzed"].partitions
        assert {len(p.replicas) for p in parts.values()} == {3}
        assert topic_configs(admin, "rf.call_analyzed")["min.insync.replicas"].value == "2"
    finally:
        stopped = _cli("stop", home=tmp_path, port=port)
    assert stopped.returncode == 0, stopped.stderr
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftover == [], "a node's JVM outlived `kafka stop`"
    after = _cli("status", home=tmp_path, port=port)
    assert after.returncode == 1 and after.stdout.count("is not running") == 3
