"""Consumer lag as Kafka's own tools report it: per partition, the log end offset minus the offset the
consumer group committed (the whole retained log when it committed none).

Asked of the brokers at every call, not taken from the consumer's fetch state: a consumer that is
stuck stops fetching, and its last fetched high watermark would show no lag. A plain consumer that
never joins the group asks (Admin's ListConsumerGroupOffsets crashed the interpreter, in
confluent-kafka 2.16, while a fresh broker's group coordinator was loading).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from kernel.errors import CallstreamError

_librdkafka = logging.getLogger("kernel.lag.librdkafka")
_librdkafka.setLevel(logging.CRITICAL)  # an unreachable broker is reported by the caller, once

Partition = tuple[str, int]
T = TypeVar("T")

# Answers that change in a moment: a broker just started, a topic just created, a leader or the group
# coordinator moving (librdkafka marks some of them retriable, not all).
_PASSING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)


class LagUnavailable(CallstreamError):
    """Kafka did not say the offsets in time."""


class GroupLag:
    """The lag of consumer group `group` on the partitions it is asked about."""

    def __init__(self, bootstrap: str, group: str, timeout_s: float = 5.0) -> None:
        self.group = group
        self.timeout_s = timeout_s
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False},
            error_cb=lambda _err: None,
            logger=_librdkafka,
        )
        self._lock = threading.Lock()  # one question at a time (two scrapes at once share the client)

    def partitions(self, topics: Iterable[str]) -> list[Partition]:
        """Every partition of `topics` (those that exist) as the brokers list them now."""
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            meta = self._ask(deadline, lambda wait: self._consumer.list_topics(timeout=wait))
        return [(t, p) for t in topics if t in meta.topics for p in sorted(meta.topics[t].partitions)]

    def query(self, partitions: Iterable[Partition]) -> dict[Partition, int]:
        """Messages not yet committed by the group, per (topic, partition); within `timeout_s` in all."""
        tps = [TopicPartition(t, p) for t, p in partitions]
        if not tps:
            return {}
        deadline = time.monotonic() + self.timeout_s
        with self._lock:
            committed = self._ask(deadline, lambda wait: self._consumer.committed(tps, timeout=wait))
            done = {(tp.topic, tp.partition): tp.offset for tp in committed}
            out = {}
            for tp in tps:
                low, high = self._watermarks(deadline, tp)
                start = done.get((tp.topic, tp.partition), -1)
                out[(tp.topic, tp.partition)] = max(0, high - (start if start >= 0 else low))
        return out

    def _watermarks(self, deadline: float, tp: TopicPartition) -> tuple[int, int]:
        low, high = self._ask(deadline, lambda wait: self._consumer.get_watermark_offsets(tp, timeout=wait))
        return int(low), int(high)

    def _ask(self, deadline: float, ask: Callable[[float], T]) -> T:
        """`ask(seconds left)`, again after a passing error, until the deadline."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LagUnavailable(f"consumer lag of {self.group}: Kafka did not answer in {self.timeout_s:.0f} s")
            try:
                return ask(left)
            except KafkaException as exc:
                err = exc.args[0]
                if not (err.retriable() or err.code() in _PASSING):
                    raise LagUnavailable(f"consumer lag of {self.group}: {err.str()}") from exc
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
