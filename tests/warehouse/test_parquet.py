"""The Parquet publisher and folder on a real DuckDB file: parts per load, rewrites of replaced rows,
merges by size tier, snapshots that readers keep, expiry, and what an interrupted publish leaves."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import duckdb
import orjson
import pytest

from callstream.fakecalls import CallFactory, Fleet
from tests.support.parquet import DAY_MS, T0, assert_same, load_calls, rows
from warehouse.compaction import TIER
from warehouse.migrations import migrate
from warehouse.parquet import ParquetPublisher
from warehouse.parquet_folder import FILES, SNAPSHOTS, ParquetFolder, parts_of
from warehouse.read import connect, refresh
from warehouse.schema import CALL_FAMILY


@pytest.fixture
def db(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    migrate(con)
    return con


@pytest.fixture
def factory() -> CallFactory:
    return CallFactory(Fleet(seed=41), seed=41, turns=(2, 4))


def _calls(factory: CallFactory, n: int, day: int = 0) -> list[bytes]:
    return [factory.events("completed", now_ms=T0 + day * DAY_MS)[-1].body() for _ in range(n)]


def _day(root: Path, table: str = "calls") -> Path:
    return next(iter((root / table).glob("day=*")))


def test_a_publish_writes_new_rows_and_rewrites_only_the_part_of_a_replaced_row(db, factory, tmp_path: Path):
    root = tmp_path / "parquet"
    pub = ParquetPublisher(db, root)
    first = _calls(factory, 5)
    for seq, bodies in enumerate([first, _calls(factory, 5), _calls(factory, 5)], 1):
        load_calls(db, seq, bodies)
        assert pub.publish() > 0
    day = _day(root)
    assert [(p.lo, p.hi) for p in parts_of(day)] == [(0, 1), (1, 2), (2, 3)]  # one part per publish
    assert_same(db, root)
    inodes = {p.name: (day / p.name).stat().st_ino for p in parts_of(day)}

    # A call of the first load, loaded again changed: only the first part is rewritten, as a new file.
    changed = orjson.loads(first[0])
    changed["call"]["call_analysis"]["call_successful"] = not changed["call"]["call_analysis"]["call_successful"]
    load_calls(db, 4, [orjson.dumps(changed)])
    pub.publish()
    assert_same(db, root)
    after = {p.name: (day / p.name).stat().st_ino for p in parts_of(day)}
    assert after.pop("part-000000000003-000000000004.parquet")  # the new load's part
    assert after["part-000000000000-000000000001.parquet"] != inodes["part-000000000000-000000000001.parquet"]
    assert {n: i for n, i in after.items() if not n.startswith("part-000000000000-")} == {
        n: i for n, i in inodes.items() if not n.startswith("part-000000000000-")
    }
    reader = connect(root)
    assert reader.execute(
        "SELECT call_successful FROM calls WHERE call_id = ?", [changed["call"]["call_id"]]
    ).fetchall() == [(changed["call"]["call_analysis"]["call_successful"],)]


def test_a_publish_touches_no_file_of_the_days_it_does_not_change(db, factory, tmp_path: Path):
    root = tmp_path / "parquet"
    pub = ParquetPublisher(db, root)
    for seq in range(1, 11):  # ten days, a load each
        load_calls(db, seq, _calls(factory, 3, day=seq))
        pub.publish()
    stored = {f: f.stat() for f in (root / FILES).glob("*/day=*/*.parquet")}
    snapshots = len(list((root / SNAPSHOTS).glob("*.json")))
    load_calls(db, 11, _calls(factory, 3, day=11))
    pub.publish()
    assert len(list((root / FILES).glob("*/day=*/*.parquet"))) == len(stored) + len(CALL_FAMILY.tables)
    # The other days' files are neither linked again nor rewritten: a hard link each, for its live part.
    for f, st in stored.items():
        now = f.stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_nlink) == (st.st_ino, st.st_mtime_ns, 2), f
    assert len(list((root / SNAPSHOTS).glob("*.json"))) <= snapshots + 2  # the publish, and a merge of call_days
    assert_same(db, root)


def test_a_day_s_parts_are_merged_by_size_tier(db, factory, tmp_path: Path):
    root = tmp_path / "parquet"
    pub = ParquetPublisher(db, root)
    counts = []
    for seq in range(1, 4 * TIER * TIER + 1):
        load_calls(db, seq, _calls(factory, 4))
        pub.publish()
        counts.append(len(parts_of(_day(root))))
    # 64 publishes of 4 calls: parts of 4, 16 and 64 rows, never TIER of one size, then one of 256.
    assert max(counts) == 3 * (TIER - 1) and counts[-1] == 1
    assert_same(db, root)


def test_a_reader_keeps_its_snapshot_and_old_files_go_after_the_retention(db, factory, tmp_path: Path):
    root = tmp_path / "parquet"
    pub = ParquetPublisher(db, root, retention_seconds=3600)
    first = _calls(factory, 4)
    load_calls(db, 1, first)
    pub.publish()
    reader = connect(root)
    before = rows(reader, "calls")
    load_calls(db, 2, first)  # every call of the first part replaced: the part goes away
    pub.publish()
    assert rows(reader, "calls") == before  # the reader still reads the files of its snapshot
    retired = [f for f in (root / FILES).rglob("*.parquet") if f.stat().st_nlink == 1]
    assert len(retired) == len(CALL_FAMILY.tables)
    assert pub.folder.expire() == 0  # within the retention: kept
    assert pub.folder.expire(retention_seconds=0) == len(retired)
    assert not any(f.exists() for f in retired)
    assert [p.name for p in (root / SNAPSHOTS).glob("*.json")] == [f"{pub.folder.generation}.json"]
    refresh(reader, root)
    assert rows(reader, "calls") == rows(db, "calls")


def test_what_an_interrupted_publish_leaves_is_cleaned_up(db, factory, tmp_path: Path):
    root = tmp_path / "parquet"
    pub = ParquetPublisher(db, root)
    for seq in range(1, 4):
        load_calls(db, seq, _calls(factory, 5))
        pub.publish()
    day = _day(root)
    # A part inside another one's range (a crash between a merge and its removals), a staged file,
    # and a file in _files that no live part and no snapshot names (a crash before the snapshot).
    big = tmp_path / "big.parquet"
    duckdb.sql(f"SELECT * FROM read_parquet('{day}/*.parquet', hive_partitioning = false)").write_parquet(str(big))
    shutil.move(big, day / "part-000000000000-000000000003.parquet")
    (day / ".part-000000000003-000000000004.parquet.tmp").write_bytes(b"half")
    stray = root / FILES / "calls" / day.name / "part-000000000009-000000000010.00000000000000000001.parquet"
    shutil.copy(day / "part-000000000000-000000000003.parquet", stray)
    pub2 = ParquetPublisher(db, root)
    assert [(p.lo, p.hi) for p in parts_of(day)] == [(0, 3)]  # the covered parts are gone, once
    assert not list(root.rglob("*.tmp"))
    assert_same(db, root)
    assert pub2.folder.expire(retention_seconds=0) >= 1
    assert not stray.exists()


def test_a_folder_of_an_older_sink_is_taken_over(db, factory, tmp_path: Path):
    root = tmp_path / "parquet"
    pub = ParquetPublisher(db, root)
    load_calls(db, 1, _calls(factory, 5))
    pub.publish()
    # The older layout: live parts only, and snapshots as folders of hard links.
    shutil.rmtree(root / FILES)
    shutil.rmtree(root / SNAPSHOTS)
    old = root / SNAPSHOTS / f"{time.time_ns() - 10**12:020d}"
    for f in root.glob("*/day=*/*.parquet"):
        (old / f.parent.parent.name / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, old / f.parent.parent.name / f.parent.name / f.name)
    (root / SNAPSHOTS / "CURRENT").write_text(old.name)
    assert len(rows(connect(root), "calls")) == 5  # an old snapshot still reads
    folder = ParquetFolder(root, retention_seconds=0)
    with folder.locked():
        folder.expire()
    assert not old.exists()
    load_calls(db, 2, _calls(factory, 5))
    ParquetPublisher(db, root).publish()
    assert_same(db, root)
