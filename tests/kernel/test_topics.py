"""Topic set-up against the real broker: create what is missing, wait for what appears later."""

from __future__ import annotations

import threading

import pytest
from confluent_kafka.admin import AdminClient

from callstream.localkafka import free_port
from kernel.catalogue import all_topics
from kernel.topics import create_missing, ensure_topics, wait_for_topics

pytestmark = pytest.mark.kafka


def test_missing_topics_are_created_with_our_partition_count(kafka_bootstrap, prefix):
    said: list[str] = []
    counts = wait_for_topics(kafka_bootstrap, all_topics(prefix), create_partitions=3, on_wait=said.append)
    assert counts == {t: 3 for t in all_topics(prefix)}
    assert ensure_topics(kafka_bootstrap, prefix) == []  # idempotent: nothing left to create


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
