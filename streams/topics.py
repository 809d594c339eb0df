"""The topics the worker reads and writes, and the one partition count they must share.

The processor keeps each call's state and each partition's book on the partition number of the
call's events, so every event topic and the state table's changelog must have the same partition
count. The worker takes it from the event topics as they exist (created by whoever came first:
the worker, the gateway, or the broker's auto-creation) and stops when they disagree. The
changelog's replication follows the same rule as the topics callstream creates (kernel.topics).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ConfigSource,
    NewTopic,
)

from kernel.catalogue import ALERTS, UNKNOWN, EventName, topic
from kernel.errors import KafkaSetupError
from kernel.topics import AUTO, Replication, topic_configs, wait_for_topics
from streams.errors import PartitionMismatch, StreamsError

log = logging.getLogger(__name__)

TABLE = "callstream_state"

# The state table's changelog holds live state, not history: compacted, with segments that close
# often enough for the log cleaner to reach them (it never touches the open one). A recovery reads
# the compacted log plus at most one open segment per partition (4 MiB, or 10 minutes of writes)
# and what is dirty (at most ~20 % of the log before the cleaner runs, and never older than an
# hour). Deletions stay readable for an hour after compaction, far longer than any recovery takes.
CHANGELOG_CONFIG = {
    "cleanup.policy": "compact",
    "segment.ms": str(10 * 60 * 1000),
    "segment.bytes": str(4 * 1024 * 1024),
    "min.cleanable.dirty.ratio": "0.2",
    "max.compaction.lag.ms": str(3600 * 1000),
    "delete.retention.ms": str(3600 * 1000),
    # A commit record carries its batch's changed calls, new alerts and drops: more than Kafka's
    # default 1 MB when a batch of thousands of events catches up (streams/processor.py bounds it).
    "max.message.bytes": str(16 * 1024 * 1024),
}


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
    layout = Layout(partitions, factor, min_insync)
    configure_changelog(bootstrap, topics.changelog, layout if changelog is None else None)
    return layout


def configure_changelog(bootstrap: str, name: str, create: Layout | None) -> list[str]:
    """Create the changelog with CHANGELOG_CONFIG (`create`: its partitions and replicas), or give
    an existing one (an older version's) those settings it has no value of its own for; return the
    names of the settings changed.

    A value set on the topic (by an operator, say) is kept, except a cleanup policy other than
    `compact`: deleting old segments would lose live state.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        if create is not None and _create(admin, name, create):
            return sorted(CHANGELOG_CONFIG)
        entries = topic_configs(admin, name)
        wrong = {k: v for k, v in CHANGELOG_CONFIG.items() if _needs(k, v, entries.get(k))}
        if wrong:
            entries_to_set = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in wrong.items()]
            done = admin.incremental_alter_configs(
                [ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=entries_to_set)]
            )
            next(iter(done.values())).result(timeout=15)
            log.info("the state changelog %s now has %s", name, ", ".join(f"{k}={v}" for k, v in wrong.items()))
        return sorted(wrong)
    except KafkaException as exc:
        settings = ",".join(f"{k}={v}" for k, v in CHANGELOG_CONFIG.items())
        raise StreamsError(
            f"cannot give the state changelog {name} its settings ({exc}); set them with `kafka-configs.sh "
            f"--bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {name} --add-config "
            f"{settings}` (or allow this worker AlterConfigs on it) and start the worker again"
        ) from exc


def _needs(key: str, value: str, entry: ConfigEntry | None) -> bool:
    if entry is None:
        return True
    if key == "cleanup.policy":
        return str(entry.value) != value
    # librdkafka gives the source as its number, not the enum.
    source = entry.source.value if isinstance(entry.source, ConfigSource) else entry.source
    return source != ConfigSource.DYNAMIC_TOPIC_CONFIG.value and str(entry.value) != value


def _create(admin: AdminClient, name: str, layout: Layout) -> bool:
    """Create the changelog; False when it exists already."""
    config = {**CHANGELOG_CONFIG, "min.insync.replicas": str(layout.min_insync)}
    new = NewTopic(name, num_partitions=layout.partitions, replication_factor=layout.replication, config=config)
    try:
        next(iter(admin.create_topics([new]).values())).result(timeout=15)
        return True
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" in str(exc):
            return False
        raise


def _changelog_partitions(bootstrap: str, changelog: str) -> tuple[int | None, int]:
    """The changelog's partition count (None while it does not exist) and the brokers the cluster shows."""
    try:
        meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5)
    except KafkaException as exc:
        raise StreamsError(f"cannot read the partition count of {changelog} from Kafka at {bootstrap}: {exc}") from exc
    found = meta.topics.get(changelog)
    partitions = len(found.partitions) if found is not None and found.error is None and found.partitions else None
    return partitions, len(meta.brokers)
