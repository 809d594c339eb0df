"""Consumer lag as Kafka's own tools report it: per partition, the log end offset minus the offset the
consumer group committed (the whole retained log when it committed none).

Asked of the brokers at every call (two Admin requests), not taken from the consumer's fetch state:
a consumer that is stuck stops fetching, and its last fetched high watermark would show no lag.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec  # type: ignore[attr-defined]

from kernel.errors import CallstreamError

_librdkafka = logging.getLogger("kernel.lag.librdkafka")
_librdkafka.setLevel(logging.CRITICAL)  # an unreachable broker is reported by the caller, once

Partition = tuple[str, int]


class LagUnavailable(CallstreamError):
    """Kafka did not say the offsets in time."""


class GroupLag:
    """The lag of consumer group `group` on the partitions it is asked about."""

    def __init__(self, bootstrap: str, group: str, timeout_s: float = 5.0) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self._admin = AdminClient({"bootstrap.servers": bootstrap}, error_cb=lambda _err: None, logger=_librdkafka)

    def partitions(self, topics: Iterable[str]) -> list[Partition]:
        """Every partition of `topics` (those that exist) as the brokers list them now."""
        try:
            meta = self._admin.list_topics(timeout=self.timeout_s)
        except KafkaException as exc:
            raise LagUnavailable(f"consumer lag of {self.group}: {exc}") from exc
        return [(t, p) for t in topics if t in meta.topics for p in sorted(meta.topics[t].partitions)]

    def query(self, partitions: Iterable[Partition]) -> dict[Partition, int]:
        """Messages not yet committed by the group, per (topic, partition). Blocks up to a few seconds."""
        tps = [TopicPartition(t, p) for t, p in partitions]
        if not tps:
            return {}
        try:
            ends = self._offsets(tps, OffsetSpec.latest())  # type: ignore[no-untyped-call]
            committed = self._committed(tps)
            fresh = [tp for tp in tps if committed.get((tp.topic, tp.partition), -1) < 0]
            starts = self._offsets(fresh, OffsetSpec.earliest()) if fresh else {}  # type: ignore[no-untyped-call]
        except (KafkaException, TimeoutError) as exc:
            raise LagUnavailable(f"consumer lag of {self.group}: {exc}") from exc
        out = {}
        for key, end in ends.items():
            done = committed.get(key, -1)
            out[key] = max(0, end - (done if done >= 0 else starts.get(key, 0)))
        return out

    def _offsets(self, tps: list[TopicPartition], spec: OffsetSpec) -> dict[Partition, int]:
        futures = self._admin.list_offsets({tp: spec for tp in tps}, request_timeout=self.timeout_s)
        return {(tp.topic, tp.partition): int(f.result(self.timeout_s).offset) for tp, f in futures.items()}

    def _committed(self, tps: list[TopicPartition]) -> dict[Partition, int]:
        request = [ConsumerGroupTopicPartitions(self.group, tps)]
        futures = self._admin.list_consumer_group_offsets(request, request_timeout=self.timeout_s)
        got = futures[self.group].result(self.timeout_s)
        return {(tp.topic, tp.partition): int(tp.offset) for tp in got.topic_partitions or []}
