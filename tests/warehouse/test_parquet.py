"""The Parquet publisher on a real DuckDB file: parts per load, rewrites of replaced rows, merges, leftovers."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import duckdb
import orjson
import pytest

from callstream.fakecalls import CallFactory, Fleet
from warehouse.db import run
from warehouse.load import replace_rows
from warehouse.migrations import migrate
from warehouse.parquet import MAX_PARTS_PER_DAY, ParquetPublisher, parts_of
from warehouse.read import connect
from warehouse.records import FamilyBatch, Source
from warehouse.schema import CALL_FAMILY


@pytest.fixture
def db(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    migrate(con)
    return con


def _load(con: duckdb.DuckDBPyConnection, seq: int, bodies: list[bytes]) -> None:
    fb = FamilyBatch(CALL_FAMILY)
    for i, b in enumerate(bodies):
        fb.add(b, Source(0, i, None, int(time.time() * 1000)))
    run(con, "BEGIN TRANSACTION")
    replace_rows(con, CALL_FAMILY, fb.tables(), seq)
    run(con, "COMMIT")


def _same(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    reader = connect(root)
    for t in CALL_FAMILY.tables:
        cols = ", ".join(t.column_names)
        order = ", ".join(t.key)
        want = con.execute(f"SELECT {cols} FROM {t.name} ORDER BY {order}").fetchall()
        assert reader.execute(f"SELECT {cols} FROM {t.name} ORDER BY {order}").fetchall() == want, t.name


def test_parts_rewrites_merges_and_leftovers(db, tmp_path: Path):
    root = tmp_path / "parquet"
    pub = ParquetPublisher(db, root, compression="zstd")
    factory = CallFactory(Fleet(seed=41), seed=41, turns=(2, 4))
    calls = {}
    for seq in range(1, 9):
        bodies = []
        for _ in range(5):
            ev = factory.events("completed")[-1]
            calls[ev.key] = ev.payload
            bodies.append(ev.body())
        _load(db, seq, bodies)
        assert pub.publish() > 0
    day = next(iter((root / "calls").glob("day=*")))
    assert len(parts_of(day)) == 8  # one part per publish: a publish writes only the new rows
    _same(db, root)

    # A call of the first load, loaded again: the first part is rewritten without its old row.
    first_id, first = next(iter(calls.items()))
    first["call"]["call_analysis"]["call_successful"] = False
    _load(db, 9, [orjson.dumps(first)])
    pub.publish()
    _same(db, root)
    reader = connect(root)
    assert reader.execute("SELECT call_successful FROM calls WHERE call_id = ?", [first_id]).fetchall() == [(False,)]

    # More parts than the limit are merged into one.
    for seq in range(10, 10 + MAX_PARTS_PER_DAY):
        _load(db, seq, [factory.events("completed")[-1].body()])
        pub.publish()
    assert len(parts_of(day)) <= MAX_PARTS_PER_DAY
    _same(db, root)

    # A part inside another one's range (what a crash between a merge and its deletions leaves) is
    # dropped by the next publisher, so no row is in two files.
    big = max(parts_of(day), key=lambda p: p.hi - p.lo)
    assert big.hi - big.lo > 1
    shutil.copy(day / big.name, day / f"part-{big.lo:012d}-{big.hi - 1:012d}.parquet")
    ParquetPublisher(db, root)
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/calls/**/*.parquet')").fetchall()
    assert n == db.execute("SELECT count(*) FROM calls").fetchall()
