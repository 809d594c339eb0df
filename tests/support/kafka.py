"""Reading a test's topics back: every message, or the count per topic."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Message, TopicPartition

from kernel.catalogue import all_topics


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
