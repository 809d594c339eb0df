"""callstream's topics: created up front (so partition counts are ours, not the broker default), and
waited for until every client's metadata shows them.

Services start in any order against a broker that may be down, may lack the topics, or may get them
later by auto-creation. `wait_for_topics` covers all of it: it creates what is missing, retries while
Kafka does not answer, and returns only once a fresh metadata request lists every topic with its
partitions, saying what it waits for every few seconds meanwhile.

Replication follows the cluster: on three or more brokers a topic gets three replicas and a write
counts once two of them have it (`min.insync.replicas`), so one lost broker loses nothing and
stops nothing; on fewer, one. CALLSTREAM_TOPIC_REPLICATION and CALLSTREAM_TOPIC_MIN_INSYNC_REPLICAS
override that (see `Replication`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigEntry, ConfigResource, NewTopic  # type: ignore[attr-defined]

from kernel.catalogue import all_topics
from kernel.errors import KafkaSetupError

log = logging.getLogger(__name__)
# librdkafka logs every failed connection attempt (dozens a second while Kafka is down); the wait
# below says what it waits for once every few seconds instead.
_librdkafka = logging.getLogger("kernel.topics.librdkafka")
_librdkafka.setLevel(logging.CRITICAL)


# Brokers from which topics are replicated, and the replicas they get then.
REPLICATED_FROM = 3


@dataclass(frozen=True)
class Replication:
    """Copies of each partition (`factor`) and how many must hold a write before it is acknowledged.

    None picks by the brokers the cluster shows: 3 and 2 on three or more brokers, else 1 and 1.
    """

    factor: int | None = None
    min_insync: int | None = None

    def resolve(self, brokers: int) -> tuple[int, int]:
        """The factor and min.insync.replicas for a cluster of `brokers`; KafkaSetupError if it cannot hold them."""
        factor = self.factor or (REPLICATED_FROM if brokers >= REPLICATED_FROM else 1)
        min_insync = self.min_insync or (2 if factor >= REPLICATED_FROM else 1)
        if factor > brokers:
            raise KafkaSetupError(
                f"replication factor {factor} needs {factor} brokers, but the cluster shows {brokers}; "
                "start the others or lower CALLSTREAM_TOPIC_REPLICATION"
            )
        if min_insync > factor:
            raise KafkaSetupError(
                f"min.insync.replicas {min_insync} is more than the replication factor {factor}; "
                "lower CALLSTREAM_TOPIC_MIN_INSYNC_REPLICAS"
            )
        return factor, min_insync


AUTO = Replication()


def _admin(bootstrap: str) -> AdminClient:
    # Callbacks go as keyword arguments: the typed config dict holds only str, int, float and bool.
    return AdminClient({"bootstrap.servers": bootstrap}, error_cb=lambda _err: None, logger=_librdkafka)


def topic_configs(admin: AdminClient, name: str, *, patience: float = 15.0) -> dict[str, ConfigEntry]:
    """A topic's configs. A topic created a moment ago (by this client or another) may be unknown for a
    moment to the broker asked, whose metadata follows the controller's: ask again until then.

    Raises the KafkaException of any other error, or of the last try once `patience` seconds are up.
    """
    deadline = time.monotonic() + patience
    while True:
        have = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, name)])
        try:
            entries: dict[str, ConfigEntry] = next(iter(have.values())).result(timeout=15)
            return entries
        except KafkaException as exc:
            unknown = exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            if not unknown or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _metadata(admin: AdminClient, timeout: float) -> Any:
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise KafkaSetupError(f"cannot list topics: {exc}. Is Kafka running? Try `callstream kafka start`.") from exc


def resolve_replication(bootstrap: str, replication: Replication = AUTO, timeout: float = 15.0) -> tuple[int, int]:
    """`replication` resolved for the brokers the cluster at `bootstrap` shows now."""
    return replication.resolve(len(_metadata(_admin(bootstrap), timeout).brokers))


def create_missing(
    admin: AdminClient,
    names: Iterable[str],
    partitions: int,
    timeout: float = 15.0,
    replication: Replication = AUTO,
    config: Mapping[str, str] | None = None,
) -> list[str]:
    """Create the topics of `names` that do not exist yet; return the ones this call created."""
    meta = _metadata(admin, timeout)
    wanted = [t for t in names if t not in meta.topics]
    if not wanted:
        return []
    factor, min_insync = replication.resolve(len(meta.brokers))
    settings = {"min.insync.replicas": str(min_insync), **(config or {})}
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=factor, config=settings) for t in wanted],
        operation_timeout=timeout,
    )
    created = []
    for name, fut in futures.items():
        try:
            fut.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            # Another process creating the same topic at the same moment is fine.
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise KafkaSetupError(f"cannot create topic {name}: {exc}") from exc
    if created:
        log.info(
            "created topics %s (%d partitions, replication factor %d, min.insync.replicas %d)",
            ", ".join(sorted(created)),
            partitions,
            factor,
            min_insync,
        )
    return created


def ensure_topics(
    bootstrap: str, prefix: str, partitions: int = 3, timeout: float = 15.0, replication: Replication = AUTO
) -> list[str]:
    """Create every `<prefix>.*` topic that does not exist yet; return the ones created."""
    return create_missing(_admin(bootstrap), all_topics(prefix), partitions, timeout, replication)


def partition_counts(admin: AdminClient, names: Iterable[str], timeout: float = 5.0) -> dict[str, int]:
    """The partition count of each topic of `names` that a fresh metadata request shows (others left out)."""
    topics = admin.list_topics(timeout=timeout).topics
    out = {}
    for name in names:
        meta = topics.get(name)
        if meta is not None and meta.error is None and meta.partitions:
            out[name] = len(meta.partitions)
    return out


def wait_for_topics(
    bootstrap: str,
    names: Iterable[str],
    *,
    create_partitions: int | None = None,
    replication: Replication = AUTO,
    on_wait: Callable[[str], None] = log.info,
    stop: threading.Event | None = None,
    say_every: float = 5.0,
    request_timeout: float = 3.0,
) -> dict[str, int]:
    """Block until every topic of `names` shows in Kafka's metadata; return their partition counts.

    With `create_partitions`, missing topics are created with that many partitions and
    `replication` first. While Kafka does not answer or a topic is missing, `on_wait` gets one line
    every `say_every` seconds (it looks again twice as often, at most every 0.5 s). Returns early
    (with what it found) when `stop` is set.
    """
    wanted = list(dict.fromkeys(names))
    admin = _admin(bootstrap)
    poll = min(0.5, say_every / 2)
    said = 0.0
    while True:
        try:
            if create_partitions is not None:
                create_missing(admin, wanted, create_partitions, request_timeout, replication)
            found = partition_counts(admin, wanted, request_timeout)
            problem = "waiting for topics " + ", ".join(t for t in wanted if t not in found)
        except (KafkaException, KafkaSetupError) as exc:
            found, problem = {}, f"waiting for Kafka at {bootstrap} ({exc})"
        if len(found) == len(wanted) or (stop is not None and stop.is_set()):
            return found
        if time.monotonic() - said >= say_every:
            on_wait(problem)
            said = time.monotonic()
        if stop is not None:
            stop.wait(poll)
        else:
            time.sleep(poll)
