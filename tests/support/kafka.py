"""Reading a test's topics back: every message, or the count per topic."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Message, TopicPartition

from kernel.catalogue import UNKNOWN, EventName, all_topics, topic


def consume_all(bootstrap: str, topic: str, expect: int, timeout: float = 30.0) -> list[Message]:
    """Read `topic` from the beginning until `expect` messages arrived or `timeout` passed."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expect and time.monotonic() < deadline:
            for m in c.consume(num_messages=500, timeout=0.5):
                if m.error() is None:
                    got.append(m)
    finally:
        c.close()
    return got


def topic_counts(bootstrap: str, prefix: str) -> dict[str, int]:
    """Messages on each topic of `prefix` (high watermarks; a test's topics start empty)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}"})
    out: dict[str, int] = {}
    try:
        md = c.list_topics(timeout=10)
        for t in all_topics(prefix):
            parts = md.topics[t].partitions if t in md.topics else {}
            out[t.removeprefix(prefix + ".")] = sum(
                c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1] for p in parts
            )
    finally:
        c.close()
    return out


def read_to_end(bootstrap: str, topic: str, timeout: float = 30.0) -> list[Message]:
    """Every message `topic` holds now, each partition read to its high watermark (a compacted
    topic has gaps in its offsets, so no message count is known beforehand)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    got: list[Message] = []
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in meta.partitions}
        left = {p for p, (low, high) in ends.items() if high > low}
        c.assign([TopicPartition(topic, p, ends[p][0]) for p in left])
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for m in c.consume(num_messages=500, timeout=0.5):
                if m.error() is None:
                    got.append(m)
                    if (m.offset() or 0) + 1 >= ends[m.partition() or 0][1]:
                        left.discard(m.partition() or 0)
        assert not left, f"{topic}: partitions {sorted(left)} not read to their end in {timeout:.0f}s"
    finally:
        c.close()
    return got


def committed_lag(bootstrap: str, group: str, prefix: str) -> dict[str, int]:
    """Messages on each event topic of `prefix` past the offsets `group` committed (none: left out)."""
    from confluent_kafka import ConsumerGroupTopicPartitions
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    (future,) = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)]).values()
    committed = {(tp.topic, tp.partition): tp.offset for tp in future.result(timeout=10).topic_partitions}
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"test-{uuid.uuid4().hex}"})
    lag: dict[str, int] = {}
    try:
        md = c.list_topics(timeout=10)
        for t in (topic(prefix, name) for name in (*EventName, UNKNOWN)):
            for p in md.topics[t].partitions if t in md.topics else {}:
                high = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
                behind = high - max(committed.get((t, p), 0), 0)
                if behind > 0:
                    lag[t] = lag.get(t, 0) + behind
    finally:
        c.close()
    return lag
