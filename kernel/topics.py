"""callstream's topics: created up front (so partition counts are ours, not the broker default), and
waited for until every client's metadata shows them.

Services start in any order against a broker that may be down, may lack the topics, or may get them
later by auto-creation. `wait_for_topics` covers all of it: it creates what is missing, retries while
Kafka does not answer, and returns only once a fresh metadata request lists every topic with its
partitions, saying what it waits for every few seconds meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from kernel.catalogue import all_topics
from kernel.errors import KafkaSetupError

log = logging.getLogger(__name__)
# librdkafka logs every failed connection attempt (dozens a second while Kafka is down); the wait
# below says what it waits for once every few seconds instead.
_librdkafka = logging.getLogger("kernel.topics.librdkafka")
_librdkafka.setLevel(logging.CRITICAL)


def _admin(bootstrap: str) -> AdminClient:
    # Callbacks go as keyword arguments: the typed config dict holds only str, int, float and bool.
    return AdminClient({"bootstrap.servers": bootstrap}, error_cb=lambda _err: None, logger=_librdkafka)


def create_missing(admin: AdminClient, names: Iterable[str], partitions: int, timeout: float = 15.0) -> list[str]:
    """Create the topics of `names` that do not exist yet; return the ones this call created."""
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise KafkaSetupError(f"cannot list topics: {exc}. Is Kafka running? Try `callstream kafka start`.") from exc
    wanted = [t for t in names if t not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in wanted], operation_timeout=timeout
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
        log.info("created topics %s", ", ".join(sorted(created)))
    return created


def ensure_topics(bootstrap: str, prefix: str, partitions: int = 3, timeout: float = 15.0) -> list[str]:
    """Create every `<prefix>.*` topic that does not exist yet; return the ones created."""
    return create_missing(_admin(bootstrap), all_topics(prefix), partitions, timeout)


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
    on_wait: Callable[[str], None] = log.info,
    stop: threading.Event | None = None,
    say_every: float = 5.0,
    poll: float = 0.5,
    request_timeout: float = 3.0,
) -> dict[str, int]:
    """Block until every topic of `names` shows in Kafka's metadata; return their partition counts.

    With `create_partitions`, missing topics are created with that many partitions first. While
    Kafka does not answer or a topic is missing, `on_wait` gets one line every `say_every` seconds.
    Returns early (with what it found) when `stop` is set.
    """
    wanted = list(dict.fromkeys(names))
    admin = _admin(bootstrap)
    said = 0.0
    while True:
        try:
            if create_partitions is not None:
                create_missing(admin, wanted, create_partitions, request_timeout)
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
