"""Creating callstream's topics up front, so that partition counts are ours and not the broker default."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from kernel.catalogue import all_topics
from kernel.errors import KafkaSetupError

log = logging.getLogger(__name__)


def ensure_topics(bootstrap: str, prefix: str, partitions: int = 3, timeout: float = 15.0) -> list[str]:
    """Create every `<prefix>.*` topic that does not exist yet; return the ones created."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise KafkaSetupError(
            f"cannot list topics on {bootstrap}: {exc}. Is Kafka running? Try `callstream kafka start`."
        ) from exc
    wanted = [t for t in all_topics(prefix) if t not in existing]
    if not wanted:
        return []
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in wanted],
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
                raise KafkaSetupError(f"cannot create topic {name} on {bootstrap}: {exc}") from exc
    if created:
        log.info("created topics %s", ", ".join(sorted(created)))
    return created
