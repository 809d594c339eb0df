"""Analyzed calls and chats produced straight to the topics, as the gateway would."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from callstream.fakecalls import CallFactory, Fleet
from kernel.catalogue import Header, topic


@dataclass
class Sent:
    """What a test produced: the latest version of every call and chat, and how many deliveries."""

    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    chats: dict[str, dict[str, Any]] = field(default_factory=dict)
    deliveries: int = 0

    def utterances(self, call_id: str) -> int:
        """Utterances of a call as sent (opted-out calls keep none)."""
        c = self.calls[call_id]
        if c.get("opt_out_sensitive_data_storage") or c.get("data_storage_setting") == "basic_attributes_only":
            return 0
        return sum(1 for u in c.get("transcript_object") or [])

    def total_utterances(self) -> int:
        return sum(self.utterances(cid) for cid in self.calls)


class TrafficProducer:
    """Produces analyzed calls and chats as the gateway would: key, body byte for byte, headers."""

    def __init__(self, bootstrap: str, prefix: str, seed: int = 1, turns: tuple[int, int] = (10, 24)) -> None:
        self.prefix = prefix
        self.factory = CallFactory(Fleet(seed=seed, agents=4), seed=seed, turns=turns)
        self.rng = random.Random(seed)
        self.producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4", "enable.idempotence": True}
        )
        self.sent = Sent()
        # flush() returning 0 only means no message is waiting: a refused one leaves the queue too,
        # so every delivery report is looked at.
        self.refused: list[str] = []

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.refused.append(f"{msg.topic()} key {msg.key()!r}: {err}")

    def send_raw(self, event: str, key: str, body: bytes) -> None:
        self.producer.produce(
            topic(self.prefix, event),
            key=key.encode(),
            value=body,
            headers=[(Header.EVENT, event.encode()), (Header.RECEIVED_AT, str(int(time.time() * 1000)).encode())],
            on_delivery=self._delivered,
        )
        self.producer.poll(0)
        self.sent.deliveries += 1

    def send(self, n: int, duplicates: float = 0.0, scenario: str | None = None, **overrides: Any) -> list[str]:
        """`n` analyzed calls or chats; a share `duplicates` of them delivered twice. Returns their ids."""
        ids = []
        for _ in range(n):
            ev = self.factory.events(scenario, **overrides)[-1]
            obj = ev.payload.get("call") or ev.payload["chat"]
            (self.sent.calls if "call" in ev.payload else self.sent.chats)[ev.key] = obj
            body = ev.body()
            self.send_raw(ev.event, ev.key, body)
            if self.rng.random() < duplicates:
                self.send_raw(ev.event, ev.key, body)
            ids.append(ev.key)
        return ids

    def flush(self) -> None:
        assert self.producer.flush(60) == 0, "the broker did not acknowledge every message"
        assert not self.refused, f"{len(self.refused)} messages were refused: {self.refused[:5]}"
