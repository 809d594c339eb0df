"""Simulated-time traffic for `make bench-history`: calls of the simulator's generator, re-stamped onto
a clock the benchmark advances, produced straight to the topics as the gateway would.

Generating a call takes the simulator about a millisecond (random ids, transcripts, costs); a month
at 50,000 calls a day is 1.5 million of them. So a pool of the generator's calls (its scenario mix,
short transcripts: 2-3 turns, so 1-3 `transcript_updated` per call) is made once, and each call of
the month is one of them with a new id and its timestamps moved to its start time. A call's events
are received, in the platform's order, from its start to its end, and its analysis 20 s after; a
share of deliveries is repeated a few seconds later (Retell's retries). Events of all calls go out in
`received_at` order, which is also the order the bodies' own timestamps tell.
"""

from __future__ import annotations

import heapq
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Producer

from callstream.fakecalls import CallFactory, Event, Fleet
from kernel.catalogue import Header, topic

DAY_MS = 24 * 3600 * 1000
POOL = 3000
RETRIED = 0.01  # share of deliveries sent twice
_ANALYSIS_LAG_MS = 20_000
_RETRY_LAG_MS = 5_000
_ID = string.ascii_letters + string.digits


@dataclass
class Sent:
    """What the benchmark produced: what the worker's totals must show."""

    calls: int = 0
    chats: int = 0
    events: int = 0  # distinct events (the worker counts a repeated delivery once)
    messages: int = 0  # deliveries, repeats included
    bytes: int = 0
    by_event: Counter[str] = field(default_factory=Counter)


def _timed(events: list[Event]) -> list[tuple[int, Event]]:
    """Each event with its offset (ms) from the call's start: spread over the call, the analysis last."""
    subject = events[-1].payload.get("call") or events[-1].payload["chat"]
    length = max(1000, int(subject.get("end_timestamp", subject["start_timestamp"])) - subject["start_timestamp"])
    *live, analyzed = events
    out = [(length * i // max(1, len(live) - 1), ev) for i, ev in enumerate(live)]
    out.append((length + _ANALYSIS_LAG_MS, analyzed))
    return out


class Pool:
    """Calls of the simulator's generator, given out again with new ids at new start times."""

    def __init__(self, seed: int, agents: int = 8, size: int = POOL) -> None:
        factory = CallFactory(Fleet(seed=seed, agents=agents), seed=seed, turns=(2, 3))
        self.calls = [_timed(factory.events(now_ms=0)) for _ in range(size)]
        self.rng = random.Random(seed)

    def call(self, start: int) -> list[tuple[int, str, str, bytes]]:
        """A call (or chat) starting at `start`: (received_at, event, key, body) of each delivery."""
        template = self.rng.choice(self.calls)
        first = template[0][1]
        kind = "call" if "call" in first.payload else "chat"
        key = f"{kind}_" + "".join(self.rng.choices(_ID, k=28))
        out = []
        for offset, ev in template:
            out.append((start + offset, ev.event, key, _restamp(ev.payload, kind, key, start)))
        return out


def _restamp(payload: dict[str, Any], kind: str, key: str, start: int) -> bytes:
    subject = dict(payload[kind])
    shift = start - subject["start_timestamp"]
    subject[f"{kind}_id"] = key
    for name in ("start_timestamp", "end_timestamp", "transfer_end_timestamp"):
        if name in subject:
            subject[name] += shift
    return orjson.dumps({**payload, kind: subject})


class Traffic:
    """Produces day after day of calls onto the topics of a prefix, in event-time order."""

    def __init__(self, bootstrap: str, prefix: str, start_ms: int, calls_per_day: int, seed: int = 5) -> None:
        self.prefix = prefix
        self.start_ms = start_ms
        self.calls_per_day = calls_per_day
        self.pool = Pool(seed)
        self.rng = random.Random(seed + 1)
        self.sent = Sent()
        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "linger.ms": 50,
                "compression.type": "lz4",
                "queue.buffering.max.messages": 500_000,
            }
        )
        # (received_at, n, event, key, body, first delivery?): what is due later
        self._pending: list[tuple[int, int, str, str, bytes, bool]] = []
        self._n = 0

    def day(self, d: int) -> None:
        """Produce day `d` (1-based): its calls start uniformly over the day; every delivery due before
        the day's end goes out (a call still going on finishes the next day)."""
        begin = self.start_ms + (d - 1) * DAY_MS
        starts = sorted(begin + self.rng.randrange(DAY_MS) for _ in range(self.calls_per_day))
        for start in starts:
            self._flush_until(start)
            for at, event, key, body in self.pool.call(start):
                self._push(at, event, key, body, first=True)
                if self.rng.random() < RETRIED:
                    self._push(at + _RETRY_LAG_MS, event, key, body, first=False)
            self.sent.calls += key_kind(key) == "call"
            self.sent.chats += key_kind(key) == "chat"
        self._flush_until(begin + DAY_MS)
        self.producer.flush(120)

    def finish(self) -> None:
        """Send what is still due (the last calls' ends and analyses)."""
        self._flush_until(2**62)
        self.producer.flush(120)

    def _push(self, at: int, event: str, key: str, body: bytes, *, first: bool) -> None:
        self._n += 1
        heapq.heappush(self._pending, (at, self._n, event, key, body, first))

    def _flush_until(self, until: int) -> None:
        pending = self._pending
        while pending and pending[0][0] <= until:
            at, _, event, key, body, first = heapq.heappop(pending)
            self._produce(at, event, key, body)
            if first:
                self.sent.events += 1
                self.sent.by_event[event] += 1

    def _produce(self, at: int, event: str, key: str, body: bytes) -> None:
        headers: list[tuple[str, str | bytes | None]] = [
            (Header.EVENT, event.encode()),
            (Header.RECEIVED_AT, b"%d" % at),
        ]
        while True:
            try:
                self.producer.produce(topic(self.prefix, event), key=key.encode(), value=body, headers=headers)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)
        self.sent.messages += 1
        self.sent.bytes += len(body)


def key_kind(key: str) -> str:
    return key.partition("_")[0]
