"""Topic set-up against the real broker: create what is missing, wait for what appears later."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource

from callstream.localkafka import free_port
from kernel.catalogue import all_topics
from kernel.errors import KafkaSetupError
from kernel.topics import Replication, create_missing, ensure_topics, topic_configs, wait_for_topics


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


class _LateBroker:
    """An admin client whose broker learns of the topic after `unknown_for` describes."""

    def __init__(self, unknown_for: int, error: int = KafkaError.UNKNOWN_TOPIC_OR_PART) -> None:
        self.asked = 0
        self.unknown_for = unknown_for
        self.error = error

    def describe_configs(self, resources: list[ConfigResource]) -> dict[ConfigResource, Future[dict[str, str]]]:
        self.asked += 1
        answer: Future[dict[str, str]] = Future()
        if self.asked <= self.unknown_for:
            answer.set_exception(KafkaException(KafkaError(self.error)))
        else:
            answer.set_result({"cleanup.policy": "compact"})
        return {resources[0]: answer}


def test_a_topic_another_client_just_created_is_asked_about_again_until_the_broker_knows_it() -> None:
    broker = _LateBroker(unknown_for=3)
    configs = topic_configs(broker, "p.call_started", patience=5)  # type: ignore[arg-type]
    assert list(configs) == ["cleanup.policy"]
    assert broker.asked == 4


def test_a_topic_the_broker_never_learns_of_or_refuses_fails_with_the_brokers_error() -> None:
    with pytest.raises(KafkaException, match="UNKNOWN_TOPIC_OR_PART"):
        topic_configs(_LateBroker(unknown_for=10**6), "p.call_started", patience=0.5)  # type: ignore[arg-type]
    refused = _LateBroker(unknown_for=1, error=KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException, match="TOPIC_AUTHORIZATION_FAILED"):
        topic_configs(refused, "p.call_started")  # type: ignore[arg-type]
    assert refused.asked == 1
