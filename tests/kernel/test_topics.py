"""Topic set-up against the real broker: create what is missing, wait for what appears later."""

from __future__ import annotations

import threading

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from callstream.localkafka import free_port
from kernel.catalogue import all_topics
from kernel.errors import KafkaSetupError
from kernel.topics import Replication, create_missing, ensure_topics, wait_for_topics


@pytest.mark.parametrize(
    ("replication", "brokers", "resolved"),
    [
        (Replication(), 1, (1, 1)),
        (Replication(), 2, (1, 1)),
        (Replication(), 3, (3, 2)),
        (Replication(), 5, (3, 2)),
        (Replication(2), 3, (2, 1)),
        (Replication(3, 3), 3, (3, 3)),
        (Replication(min_insync=1), 3, (3, 1)),
    ],
)
def test_replication_follows_the_brokers_unless_configured(
    replication: Replication, brokers: int, resolved: tuple[int, int]
) -> None:
    assert replication.resolve(brokers) == resolved


def test_replication_the_cluster_cannot_hold_is_refused_saying_what_to_change() -> None:
    with pytest.raises(
        KafkaSetupError, match=r"needs 3 brokers, but the cluster shows 1.*CALLSTREAM_TOPIC_REPLICATION"
    ):
        Replication(3).resolve(1)
    with pytest.raises(
        KafkaSetupError, match=r"min\.insync\.replicas 2 is more than.*CALLSTREAM_TOPIC_MIN_INSYNC_REPLICAS"
    ):
        Replication(1, 2).resolve(3)


def _replication_of(bootstrap: str, name: str) -> tuple[int, str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    replicas = {len(p.replicas) for p in admin.list_topics(name, timeout=10).topics[name].partitions.values()}
    resource = ConfigResource("topic", name)
    min_insync = admin.describe_configs([resource])[resource].result()["min.insync.replicas"].value
    return replicas.pop(), min_insync


@pytest.mark.kafka
def test_on_one_broker_topics_get_one_replica_and_more_is_refused(kafka_bootstrap, prefix):
    ensure_topics(kafka_bootstrap, prefix)
    assert _replication_of(kafka_bootstrap, f"{prefix}.call_analyzed") == (1, "1")
    with pytest.raises(KafkaSetupError, match="replication factor 3 needs 3 brokers, but the cluster shows 1"):
        ensure_topics(kafka_bootstrap, f"{prefix}x", replication=Replication(3))


@pytest.mark.kafka
def test_missing_topics_are_created_with_our_partition_count(kafka_bootstrap, prefix):
    said: list[str] = []
    counts = wait_for_topics(kafka_bootstrap, all_topics(prefix), create_partitions=3, on_wait=said.append)
    assert counts == {t: 3 for t in all_topics(prefix)}
    assert ensure_topics(kafka_bootstrap, prefix) == []  # idempotent: nothing left to create


@pytest.mark.kafka
def test_a_topic_created_later_by_someone_else_ends_the_wait(kafka_bootstrap, prefix):
    name = f"{prefix}.call_started"
    said: list[str] = []
    later = threading.Timer(1.5, lambda: create_missing(AdminClient({"bootstrap.servers": kafka_bootstrap}), [name], 2))
    later.start()
    try:
        counts = wait_for_topics(kafka_bootstrap, [name], on_wait=said.append, say_every=0.5)
    finally:
        later.cancel()
    assert counts == {name: 2}
    assert said and all(s == f"waiting for topics {name}" for s in said)


@pytest.mark.kafka
def test_an_unreachable_broker_is_named_while_waiting_and_stop_ends_it(capfd):
    bootstrap = f"127.0.0.1:{free_port()}"
    said: list[str] = []
    stop = threading.Event()
    threading.Timer(3.0, stop.set).start()
    counts = wait_for_topics(
        bootstrap,
        ["x.call_started"],
        create_partitions=3,
        on_wait=said.append,
        stop=stop,
        say_every=0.5,
        request_timeout=1.0,
    )
    assert counts == {}
    assert said and said[0].startswith(f"waiting for Kafka at {bootstrap}")
    # One line every few seconds says it; librdkafka's own line per failed connection stays quiet.
    assert "Connection refused" not in capfd.readouterr().err
