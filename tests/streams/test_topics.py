"""The one partition count the worker's topics must share."""

from __future__ import annotations

import pytest

from streams.errors import PartitionMismatch
from streams.topics import WorkerTopics, agreed_partitions


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
