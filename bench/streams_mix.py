"""The event mixes the streams benchmarks pre-fill, and the totals every processor must arrive at.

Bodies come from the simulator's generator with its default transcript lengths; about 1% of the
messages are redelivered later (Retell retries resend the same body), so every processor has to
deduplicate. The expected totals are computed offline by the worker's own `Processor` over a
`DictStore`, fed exactly the messages written.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from confluent_kafka import Producer

from callstream.fakecalls import CallFactory, Fleet
from kernel.catalogue import EventName, Header, topic
from streams.alertrules import load_config
from streams.calls import decode_body
from streams.metrics import ALL
from streams.processor import DictStore, EventMessage, Processor

# The per-agent totals every processor of the comparison computes (the worker's counter names).
TOTALS = ("calls_started", "calls_ended", "calls_analyzed", "failed", "calls_successful")
LIFECYCLE = frozenset({EventName.CALL_STARTED, EventName.CALL_ENDED, EventName.CALL_ANALYZED})
SMALL = frozenset(
    {
        EventName.CALL_STARTED,
        EventName.TRANSFER_STARTED,
        EventName.TRANSFER_BRIDGED,
        EventName.TRANSFER_CANCELLED,
        EventName.TRANSFER_ENDED,
        EventName.CHAT_STARTED,
    }
)
REDELIVERED = 0.01

Totals = dict[str, dict[str, int]]  # agent -> counter -> n


@dataclass(frozen=True)
class Mix:
    name: str
    description: str
    events: frozenset[str] | None = None  # None: every event type the simulator makes

    def keeps(self, event: str) -> bool:
        return self.events is None or event in self.events


MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        Mix("realistic", "the simulator's mix: every event type, default transcript lengths"),
        Mix("lifecycle", "call_started, call_ended and call_analyzed only", LIFECYCLE),
        Mix("small", "events under 1 KB: call_started, transfer_*, chat_started", SMALL),
        Mix("analyzed", "call_analyzed only (the full call object, about 26 KB)", frozenset({EventName.CALL_ANALYZED})),
    )
}


@dataclass
class Expected:
    """What was written, and what a correct processor must count from it."""

    mix: Mix
    messages: int = 0
    distinct: int = 0  # events the worker counts: redeliveries and repeated transcripts excluded
    bytes: int = 0
    by_topic: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    bytes_by_type: Counter[str] = field(default_factory=Counter)
    raw: Counter[tuple[str, str]] = field(default_factory=Counter)  # (agent, event) -> messages, duplicates included
    totals: Totals = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)  # distinct events per type, as the worker counts them

    def describe(self) -> str:
        """Counts per event type and mean body size, as the results state them."""
        parts = [
            f"{e} {self.by_type[e]:,} ({self.bytes_by_type[e] / self.by_type[e] / 1024:.1f} KB)"
            for e in sorted(self.by_type, key=lambda e: -self.by_type[e])
        ]
        return (
            f"{self.messages:,} messages ({self.messages - self.distinct:,} of them redeliveries or repeated "
            f"snapshots), mean body {self.bytes / max(1, self.messages) / 1024:.1f} KB: " + ", ".join(parts)
        )


def agent_of(body: bytes) -> str:
    decoded = decode_body(body)
    subject = decoded.call or decoded.chat
    return (subject.agent_id if subject is not None else None) or "unknown"


def _messages(mix: Mix, count: int, seed: int) -> Iterator[tuple[str, str, bytes]]:
    """(event, key, body) of `count` messages: whole calls of the mix, ~1% redelivered a call later."""
    factory = CallFactory(Fleet(seed=seed, agents=5), seed=seed)
    rng = random.Random(seed)
    n, again = 0, list[tuple[str, str, bytes]]()
    while n < count:
        later: list[tuple[str, str, bytes]] = []
        for ev in factory.events():
            if not mix.keeps(ev.event):
                continue
            item = (ev.event, ev.key, ev.body())
            if rng.random() < REDELIVERED:
                later.append(item)
            yield item
            n += 1
            if n >= count:
                return
        for item in again:
            yield item
            n += 1
            if n >= count:
                return
        again = later


def prefill(bootstrap: str, prefix: str, mix: Mix, count: int, seed: int = 2) -> Expected:
    """Write `count` messages of `mix` keyed by call id with the gateway's headers; return what to expect."""
    offline = Processor(DictStore(), load_config())
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            # As the gateway's: acks=all and no reordering on a retry, so each partition holds the
            # messages in the order the expected totals were computed in.
            "enable.idempotence": True,
            "linger.ms": 20,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    exp = Expected(mix)
    now = int(time.time() * 1000)
    batch: list[EventMessage] = []
    for event, key, body in _messages(mix, count, seed):
        at = now + exp.messages // 100
        headers: list[tuple[str, str | bytes | None]] = [(Header.EVENT, event), (Header.RECEIVED_AT, str(at))]
        while True:
            try:
                p.produce(topic(prefix, event), key=key, value=body, headers=headers)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
        exp.messages += 1
        exp.bytes += len(body)
        exp.by_topic[topic(prefix, event)] += 1
        exp.by_type[event] += 1
        exp.bytes_by_type[event] += len(body)
        exp.raw[(agent_of(body), event)] += 1
        batch.append(EventMessage(0, event, key.encode(), body, at))
        if len(batch) >= 1000:
            offline.process(batch)
            batch = []
    offline.process(batch)
    p.flush()
    book = offline.book(0)
    exp.events = {k.removeprefix("event:"): v for k, v in book.totals[ALL].counts.items() if k.startswith("event:")}
    exp.distinct = sum(exp.events.values())
    exp.totals = {
        agent: {name: agg.counts.get(name, 0) for name in TOTALS} for agent, agg in book.totals.items() if agent != ALL
    }
    return exp


def compare(expected: Totals, got: Totals) -> str:
    """'exact', or how many per-agent totals differ and the first difference."""
    diffs = []
    for agent in sorted(set(expected) | set(got)):
        for name in TOTALS:
            want, have = expected.get(agent, {}).get(name, 0), got.get(agent, {}).get(name, 0)
            if want != have:
                diffs.append(f"{agent} {name} {have} (expected {want})")
    if not diffs:
        return "exact"
    return f"NOT exact: {len(diffs)} totals differ, e.g. {diffs[0]}"
