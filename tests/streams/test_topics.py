"""The one partition count the worker's topics must share."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

from streams.errors import PartitionMismatch
from streams.topics import WorkerTopics, _describe, agreed_partitions


def test_topics_that_agree_give_their_count() -> None:
    assert agreed_partitions({"p.call_started": 2, "p.call_ended": 2}, "fix it") == 2


def test_topics_that_disagree_are_named_with_their_counts_and_what_to_do() -> None:
    with pytest.raises(PartitionMismatch) as caught:
        agreed_partitions({"p.call_started": 3, "p.call_ended": 1, "p.unknown": 3}, "Recreate the odd ones.")
    assert str(caught.value) == (
        "the worker's topics must all have the same partition count, but 1 partitions: p.call_ended; "
        "3 partitions: p.call_started, p.unknown. Recreate the odd ones."
    )


def test_the_worker_reads_every_event_topic_and_unknown() -> None:
    topics = WorkerTopics("p", "p-changelog")
    assert len(topics.sources) == 12 and "p.unknown" in topics.sources and "p.call_analyzed" in topics.sources
    assert topics.alerts == "p.alerts"


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


def test_a_changelog_another_worker_just_created_is_asked_about_again_until_the_broker_knows_it() -> None:
    broker = _LateBroker(unknown_for=3)
    configs = _describe(broker, "p-changelog", patience=5)  # type: ignore[arg-type]
    assert list(configs) == ["cleanup.policy"]
    assert broker.asked == 4


def test_a_changelog_the_broker_never_learns_of_or_refuses_fails_with_the_brokers_error() -> None:
    with pytest.raises(KafkaException, match="UNKNOWN_TOPIC_OR_PART"):
        _describe(_LateBroker(unknown_for=10**6), "p-changelog", patience=0.5)  # type: ignore[arg-type]
    refused = _LateBroker(unknown_for=1, error=KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException, match="TOPIC_AUTHORIZATION_FAILED"):
        _describe(refused, "p-changelog")  # type: ignore[arg-type]
    assert refused.asked == 1
