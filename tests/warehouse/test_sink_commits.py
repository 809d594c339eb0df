"""The sink tells Kafka what it loaded (for the operators' lag view), and tells it again when Kafka
refused: a commit lost while the broker was away once left the lag above zero for good when no
batch came after it (the soak saw it)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from warehouse.settings import SinkSettings
from warehouse.sink import Sink


class Commits:
    """A consumer that only records the commits it is asked for."""

    def __init__(self) -> None:
        self.commits: list[list[tuple[str, int, int]]] = []

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the test did not expect {name}")


def test_a_refused_commit_is_made_again_and_an_accepted_one_is_not(tmp_path: Path) -> None:
    settings = SinkSettings(
        kafka_bootstrap="127.0.0.1:1", warehouse=str(tmp_path / "w.duckdb"), parquet_dir=str(tmp_path / "p")
    )
    consumer = Commits()
    sink = Sink(settings, consumer=consumer, create_topics=False)  # type: ignore[arg-type]
    try:
        sink._committed = {("t.call_analyzed", 0): 5}
        sink._commit_to_kafka()
        sink._commit_to_kafka()
        assert consumer.commits == [[("t.call_analyzed", 0, 5)]]  # once: nothing new since

        # Kafka refused it (a broker away, its coordinator loading): made again, after a pause.
        sink._on_kafka_commit(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS), [])
        sink._commit_to_kafka()
        assert len(consumer.commits) == 1
        time.sleep(1.1)
        sink._commit_to_kafka()
        assert consumer.commits == [[("t.call_analyzed", 0, 5)]] * 2

        # A partition's own error counts as a refusal too; an accepted commit is left alone.
        refused = SimpleNamespace(topic="t.call_analyzed", partition=0, error=KafkaError(KafkaError.NOT_COORDINATOR))
        sink._on_kafka_commit(None, [refused])  # type: ignore[list-item]
        time.sleep(1.1)
        sink._commit_to_kafka()
        sink._on_kafka_commit(None, [TopicPartition("t.call_analyzed", 0, 5)])
        time.sleep(1.1)
        sink._commit_to_kafka()
        assert len(consumer.commits) == 3
    finally:
        sink.close()
