"""The topics the worker reads and writes, and the one partition count they must share.

The processor keeps each call's state and each partition's book on the partition number of the
call's events, so every event topic and the state table's changelog must have the same partition
count. The worker takes it from the event topics as they exist (created by whoever came first:
the worker, the gateway, or the broker's auto-creation) and stops when they disagree. The
changelog's replication follows the same rule as the topics callstream creates (kernel.topics).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from kernel.catalogue import ALERTS, UNKNOWN, EventName, topic
from kernel.errors import KafkaSetupError
from kernel.topics import AUTO, Replication, wait_for_topics
from streams.errors import PartitionMismatch, StreamsError

TABLE = "callstream_state"


@dataclass(frozen=True)
class WorkerTopics:
    """The worker's topics under one prefix; `changelog` is the state table's, named by Faust."""

    prefix: str
    changelog: str

    @property
    def sources(self) -> list[str]:
        """Every event topic, `<prefix>.unknown` included: what the worker's agent reads."""
        return [topic(self.prefix, name) for name in (*EventName, UNKNOWN)]

    @property
    def alerts(self) -> str:
        return topic(self.prefix, ALERTS)


@dataclass(frozen=True)
class Layout:
    """The one partition count of the worker's topics, and the replicas its changelog gets."""

    partitions: int
    replication: int
    min_insync: int


def agreed_partitions(counts: Mapping[str, int], hint: str) -> int:
    """The one partition count of `counts`; PartitionMismatch naming who has which when they differ."""
    by_count: dict[int, list[str]] = {}
    for name, n in sorted(counts.items()):
        by_count.setdefault(n, []).append(name)
    if len(by_count) == 1:
        return next(iter(by_count))
    found = "; ".join(f"{n} partitions: {', '.join(names)}" for n, names in sorted(by_count.items()))
    raise PartitionMismatch(f"the worker's topics must all have the same partition count, but {found}. {hint}")


def await_partitions(
    bootstrap: str,
    topics: WorkerTopics,
    *,
    create_partitions: int,
    group: str,
    on_wait: Callable[[str], None],
    stop: threading.Event,
    replication: Replication = AUTO,
) -> Layout | None:
    """Create the missing topics, wait until Kafka shows them all, and return their partition count
    and the changelog's replication.

    None when `stop` was set meanwhile. Raises PartitionMismatch when the event topics, or the
    state table's changelog if it exists already, have different partition counts.
    """
    sources = topics.sources
    counts = wait_for_topics(
        bootstrap,
        [*sources, topics.alerts],
        create_partitions=create_partitions,
        replication=replication,
        on_wait=on_wait,
        stop=stop,
    )
    if stop.is_set():
        return None
    partitions = agreed_partitions(
        {name: counts[name] for name in sources},
        "Recreate the odd ones with the same count as the others.",
    )
    changelog, brokers = _changelog_partitions(bootstrap, topics.changelog)
    if changelog is not None and changelog != partitions:
        agreed_partitions(
            {"the event topics": partitions, topics.changelog: changelog},
            f"The state table must follow the event topics: delete {topics.changelog} and the consumer "
            f"group {group}, and the worker rebuilds its state from the event topics.",
        )
    try:
        factor, min_insync = replication.resolve(brokers)
    except KafkaSetupError as exc:
        raise StreamsError(f"the state table's changelog {topics.changelog}: {exc}") from exc
    return Layout(partitions, factor, min_insync)


def _changelog_partitions(bootstrap: str, changelog: str) -> tuple[int | None, int]:
    """The changelog's partition count (None while it does not exist) and the brokers the cluster shows."""
    try:
        meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5)
    except KafkaException as exc:
        raise StreamsError(f"cannot read the partition count of {changelog} from Kafka at {bootstrap}: {exc}") from exc
    found = meta.topics.get(changelog)
    partitions = len(found.partitions) if found is not None and found.error is None and found.partitions else None
    return partitions, len(meta.brokers)
