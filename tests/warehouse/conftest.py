"""Fixtures of the warehouse tests: analyzed calls produced straight to the topics, and the sink as a process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa
import pytest

from callstream.fakecalls import CallFactory, Fleet
from tests.support.audit import TopicLog
from tests.support.traffic import TrafficProducer
from warehouse.migrations import migrate
from warehouse.records import FamilyBatch, Source
from warehouse.schema import CHAT_FAMILY, Family


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
            env={**service_env, **sink_env, **env},
            cwd=tmp_path,
            capture_output=True,
            timeout=240,
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
    migrate(con)
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
            batch.add(
                orjson.dumps(body),
                Source(partition=partition, offset=offset + i, received_at_ms=1_790_000_000_000, loaded_at_ms=1),
            )
        return batch.tables()

    return make
