"""Compaction of the Parquet folder: `callstream warehouse compact` while a publisher publishes and
readers read, and the sink's own merge of a quiet day."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import orjson
import pytest

from callstream.fakecalls import CallFactory, Fleet
from tests.support.parquet import DAY_MS, T0, assert_same, cli_env, load_calls, rows
from warehouse import compaction
from warehouse.migrations import migrate
from warehouse.parquet import ParquetPublisher
from warehouse.parquet_folder import FILES, parts_of
from warehouse.read import connect, refresh
from warehouse.schema import CALL_FAMILY

DAYS = 3

_CONSISTENT = """
    SELECT count(*) FROM calls c
    LEFT JOIN (SELECT call_id, count(*) AS n FROM call_utterances GROUP BY ALL) u USING (call_id)
    WHERE c.utterance_count <> coalesce(u.n, 0)
"""


@pytest.fixture
def published(tmp_path: Path) -> tuple[duckdb.DuckDBPyConnection, ParquetPublisher, CallFactory]:
    """Three days of calls in many small parts, some calls delivered again (rewrites)."""
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    migrate(con)
    pub = ParquetPublisher(con, tmp_path / "parquet", retention_seconds=3600)
    factory = CallFactory(Fleet(seed=43), seed=43, turns=(2, 6))
    sent: list[bytes] = []
    for seq in range(1, 3 * DAYS * 3 + 1):
        bodies = [factory.events("completed", now_ms=T0 + (seq % DAYS) * DAY_MS)[-1].body() for _ in range(3)]
        if seq % 4 == 0:
            bodies.append(sent[seq // 2])
        sent += bodies
        load_calls(con, seq, bodies)
        pub.publish()
    return con, pub, factory


def _reader_loop(root: Path, stop: threading.Event, seen: list[str], failures: list[BaseException]) -> None:
    """Refresh and check the snapshot until stopped: no call without all its utterances, no call twice."""
    try:
        reader = connect(root)
        while not stop.is_set():
            seen.append(refresh(reader, root))
            assert reader.execute(_CONSISTENT).fetchall() == [(0,)], f"snapshot {seen[-1]} is inconsistent"
            assert reader.execute("SELECT count(*) - count(DISTINCT call_id) FROM calls").fetchall() == [(0,)]
    except BaseException as exc:
        failures.append(exc)


def test_compact_while_the_publisher_publishes_and_readers_read(published, tmp_path: Path):
    con, pub, factory = published
    root = pub.root
    assert max(len(parts_of(d)) for d in (root / "call_utterances").glob("day=*")) > 1
    early = connect(root)  # a reader on a snapshot from before the compaction
    early_rows = rows(early, "call_utterances")

    stop, seen, failures = threading.Event(), [], []
    reader = threading.Thread(target=_reader_loop, args=(root, stop, seen, failures))
    reader.start()
    pub.start()  # the sink's publisher thread, taking the folder's lock for each round
    env = cli_env(root)
    proc = subprocess.Popen(
        [sys.executable, "-m", "callstream", "warehouse", "compact"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seq = 100
    while proc.poll() is None:  # new calls keep coming while it compacts
        seq += 1
        load_calls(con, seq, [factory.events("completed", now_ms=T0 + (seq % DAYS) * DAY_MS)[-1].body()])
        pub.poke()
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out
    assert "warehouse compact: merged" in out, out
    pub.stop(final=True)
    stop.set()
    reader.join()
    if failures:
        raise failures[0]
    assert len(set(seen)) >= 2  # the readers moved through several snapshots

    assert_same(con, root)
    assert rows(early, "call_utterances") == early_rows  # its files are kept for the retention
    # Compact again with nothing new: one part per table and day, each sorted by its key.
    subprocess.run([sys.executable, "-m", "callstream", "warehouse", "compact"], env=env, check=True)
    for t in CALL_FAMILY.tables:
        for day in (root / t.name).glob("day=*"):
            assert len(parts_of(day)) == 1, day
            (f,) = day.glob("*.parquet")
            keys = duckdb.sql(f"SELECT {', '.join(t.key)} FROM read_parquet('{f}')").fetchall()
            assert keys == sorted(keys)
    assert_same(con, root)


def test_compact_deletes_what_was_retired_longer_than_retain_ago(published):
    con, pub, _ = published
    root = pub.root
    retired = [f for f in (root / FILES).rglob("*.parquet") if f.stat().st_nlink == 1]
    assert retired  # rewrites and merges retired files
    env = cli_env(root)
    r = subprocess.run(
        [sys.executable, "-m", "callstream", "warehouse", "compact", "--retain", "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert not any(f.exists() for f in retired), r.stdout + r.stderr
    assert all(f.stat().st_nlink == 2 for f in (root / FILES).rglob("*.parquet"))  # every file left is live
    assert_same(con, root)


def test_the_publisher_merges_a_quiet_day_into_one_part(published, monkeypatch):
    con, pub, factory = published
    root = pub.root
    days = sorted((root / "calls").glob("day=*"))
    assert all(len(parts_of(d)) > 1 for d in days)
    monkeypatch.setattr(compaction, "QUIET_SECONDS", 0.0)
    load_calls(con, 500, [factory.events("completed", now_ms=T0 + 10 * DAY_MS)[-1].body()])
    pub.publish()  # a new day: one of the others is quiet and becomes one part per table
    merged = [d for d in days if len(parts_of(d)) == 1]
    assert len(merged) == 1
    day = merged[0].name
    for t in CALL_FAMILY.tables:
        if (root / t.name / day).exists():
            (part,) = parts_of(root / t.name / day)
            keys = duckdb.sql(f"SELECT {', '.join(t.key)} FROM read_parquet('{root / t.name / day / part.name}')")
            assert keys.fetchall() == sorted(keys.fetchall()), t.name  # sorted by key, so lookups skip row groups
    assert_same(con, root)
    manifest = orjson.loads((root / "_snapshots" / f"{pub.folder.generation}.json").read_bytes())
    assert len(manifest["tables"]["calls"][day.removeprefix("day=")]) == 1
    assert os.path.exists(root / "_snapshots" / "CURRENT")
