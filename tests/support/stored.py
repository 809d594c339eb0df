"""What the topics of a test's prefix hold, read back to their end: what the cluster audit compares.

From it follow the worker's exact totals, by the worker's own rules for the sender's habits (see
streams/calls.py): each lifecycle event counts once per call; a `transcript_updated` counts when its
transcript is longer than every earlier one of the call on its partition (a repeat or a reordered
older snapshot does not); every call and chat counts once. And the per-call alerts the worker must
raise once each: `failed_dial` for every call that did not connect.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Consumer, TopicPartition

from kernel.catalogue import ALERTS, EventName, Subject, subject_of, topic
from streams.alertrules import load_config
from tests.support.spread import digest

_OUTCOMES = (EventName.CALL_ENDED, EventName.CALL_ANALYZED)
_RULES = load_config()


@dataclass
class Stored:
    events: set[tuple[str, str, bytes]] = field(default_factory=set)  # (event, key, body digest)
    keys: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # event -> keys
    transcript_news: int = 0  # transcript_updated the worker counts
    calls: set[str] = field(default_factory=set)
    chats: set[str] = field(default_factory=set)
    not_connected: set[str] = field(default_factory=set)  # calls owed a failed_dial alert
    alerts: Counter[str] = field(default_factory=Counter)  # per-call alert id -> messages on the alerts topic
    messages: int = 0
    _longest: dict[str, int] = field(default_factory=dict)

    def worker_counts(self) -> dict[str, int]:
        """What the worker's /api/counts must say under `events`."""
        counts = {e: len(k) for e, k in self.keys.items() if e != EventName.TRANSCRIPT_UPDATED and k}
        if self.transcript_news:
            counts[EventName.TRANSCRIPT_UPDATED] = self.transcript_news
        return counts

    def owed_alerts(self) -> set[str]:
        return {f"failed_dial:{c}" for c in self.not_connected}

    def add_event(self, event: str, key: str, body: bytes) -> None:
        self.messages += 1
        self.events.add((event, key, digest(body)))
        self.keys[event].add(key)
        (self.chats if subject_of(event) is Subject.CHAT else self.calls).add(key)
        if event == EventName.TRANSCRIPT_UPDATED:
            length = len(orjson.loads(body)["call"].get("transcript") or "")
            if length > self._longest.get(key, 0):
                self._longest[key] = length
                self.transcript_news += 1
        elif event in _OUTCOMES:
            call: dict[str, Any] = orjson.loads(body)["call"]
            reason = call.get("disconnection_reason") or "unknown"
            if _RULES.is_failed_dial(reason) or call.get("call_status") == "not_connected":
                self.not_connected.add(key)


def read_stored(bootstrap: str, prefix: str, timeout: float = 120.0) -> Stored:
    """Every message of the prefix's event topics and alerts topic, up to the end offsets of now."""
    names = {topic(prefix, e): e for e in EventName} | {topic(prefix, ALERTS): ALERTS}
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"audit-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    out = Stored()
    try:
        meta = c.list_topics(timeout=30)
        ends = {}
        for name in names:
            for p in meta.topics[name].partitions:
                ends[(name, p)] = c.get_watermark_offsets(TopicPartition(name, p), timeout=30)[1]
        todo = {tp: end for tp, end in ends.items() if end > 0}
        c.assign([TopicPartition(t, p, 0) for t, p in todo])
        deadline = time.monotonic() + timeout
        while todo:
            assert time.monotonic() < deadline, f"the topics did not read back to their end: {todo}"
            for m in c.consume(1000, timeout=0.5):
                if m.error() is not None:
                    continue
                tp = (str(m.topic()), int(m.partition() or 0))
                if tp not in todo:
                    continue
                if todo[tp] <= (m.offset() or 0) + 1:
                    del todo[tp]
                if (m.offset() or 0) >= ends[tp]:
                    continue
                kind, key = names[tp[0]], (m.key() or b"").decode()
                if kind == ALERTS:
                    alert = orjson.loads(m.value() or b"{}")
                    if alert.get("call_id"):  # the per-call rules; failure_rate is per agent and throttled
                        out.alerts[alert.get("id", key)] += 1
                else:
                    out.add_event(kind, key, m.value() or b"")
    finally:
        c.close()
    return out
