"""Fixtures of the warehouse tests: analyzed calls produced straight to the topics, and the sink as a process."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest
from confluent_kafka import Producer

from callstream.catalogue import Header, topic
from callstream.fakecalls import CallFactory, Fleet
from tests.warehouse.audit import TopicLog
from warehouse.records import FamilyBatch, Source
from warehouse.schema import CHAT_FAMILY, Family, create_all

REPO = Path(__file__).resolve().parents[2]


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
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                                  "enable.idempotence": True})
        self.sent = Sent()
        # flush() returning 0 only means no message is waiting: a refused one leaves the queue too,
        # so every delivery report is looked at.
        self.refused: list[str] = []

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.refused.append(f"{msg.topic()} key {msg.key()!r}: {err}")

    def send_raw(self, event: str, key: str, body: bytes) -> None:
        self.producer.produce(topic(self.prefix, event), key=key.encode(), value=body,
                              headers=[(Header.EVENT, event.encode()),
                                       (Header.RECEIVED_AT, str(int(time.time() * 1000)).encode())],
                              on_delivery=self._delivered)
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


@pytest.fixture
def traffic(kafka_bootstrap: str, topics: str) -> Iterator[Callable[..., TrafficProducer]]:
    made: list[TrafficProducer] = []

    def make(seed: int = 1, turns: tuple[int, int] = (10, 24)) -> TrafficProducer:
        p = TrafficProducer(kafka_bootstrap, topics, seed=seed, turns=turns)
        made.append(p)
        return p

    yield make
    for p in made:
        p.producer.flush(10)


@pytest.fixture
def topic_log(kafka_bootstrap: str, topics: str) -> Iterator[TopicLog]:
    """This test's topics as read by a consumer of its own, to audit the sink's database against."""
    log = TopicLog(kafka_bootstrap, topics)
    yield log
    log.close()


@pytest.fixture
def sink_env() -> dict[str, str]:
    """Settings that make the sink publish Parquet often, so tests see many publishes."""
    return {"CALLSTREAM_PARQUET_MIN_INTERVAL_SECONDS": "0.3", "CALLSTREAM_BATCH_MAX_SECONDS": "0.3"}


@pytest.fixture
def run_sink_once(service_env: dict[str, str], sink_env: dict[str, str], tmp_path: Path) -> Callable[..., str]:
    """`callstream sink --until-caught-up` as a process, to completion; returns its output."""

    def run(**env: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "callstream", "sink", "--until-caught-up"],
            env={**service_env, **sink_env, **env}, cwd=tmp_path, capture_output=True, timeout=240,
        )
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, out[-4000:]
        return out

    return run


@pytest.fixture
def warehouse_paths(service_env: dict[str, str]) -> tuple[Path, Path]:
    return Path(service_env["CALLSTREAM_WAREHOUSE"]), Path(service_env["CALLSTREAM_PARQUET_DIR"])


@pytest.fixture
def warehouse_db(tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    create_all(con)
    yield con
    con.close()


@pytest.fixture
def family_batch() -> Callable[..., dict[str, pa.Table]]:
    factory = CallFactory(Fleet(seed=9, agents=2), seed=9, turns=(2, 4))

    def make(family: Family, n: int, offset: int = 0, partition: int = 0) -> dict[str, pa.Table]:
        scenario = "chat" if family is CHAT_FAMILY else "completed"
        batch = FamilyBatch(family)
        for i in range(n):
            body = factory.events(scenario)[-1].payload
            batch.add(orjson.dumps(body), Source(partition=partition, offset=offset + i, received_at_ms=1_790_000_000_000,
                                                 loaded_at_ms=1))
        return batch.tables()

    return make
