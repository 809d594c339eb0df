"""Consumer lag from the brokers: end offset minus the group's commit, the whole log without one."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from callstream.localkafka import free_port
from kernel.lag import GroupLag, LagUnavailable

pytestmark = pytest.mark.kafka


def test_lag_per_partition_follows_the_groups_commits(kafka_bootstrap: str, topics: str) -> None:
    topic = f"{topics}.call_ended"
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(5):
        producer.produce(topic, value=b"{}", key=f"k{i}".encode(), partition=0)
    producer.produce(topic, value=b"{}", partition=2)
    assert producer.flush(10) == 0
    group = f"g-{uuid.uuid4().hex}"
    lag = GroupLag(kafka_bootstrap, group)
    parts = lag.partitions([topic, f"{topics}.no_such_topic"])
    assert parts == [(topic, 0), (topic, 1), (topic, 2)]
    assert lag.query(parts) == {(topic, 0): 5, (topic, 1): 0, (topic, 2): 1}  # nothing committed: all of it

    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 3), TopicPartition(topic, 2, 1)], asynchronous=False)
    finally:
        consumer.close()
    assert lag.query(parts) == {(topic, 0): 2, (topic, 1): 0, (topic, 2): 0}
    assert lag.query([]) == {}


def test_unreachable_kafka_is_one_error() -> None:
    lag = GroupLag(f"127.0.0.1:{free_port()}", "g", timeout_s=1)
    with pytest.raises(LagUnavailable, match="consumer lag of g"):
        lag.query([("t", 0)])
