"""Unit tests of the sink's batch write (no Kafka): replace_rows, its count guard before COMMIT, and the
check after it."""

from __future__ import annotations

from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest

from kernel.catalogue import topic
from warehouse import ledger
from warehouse.db import run
from warehouse.errors import WarehouseError
from warehouse.load import Batch, replace_rows
from warehouse.schema import CALL_FAMILY, CHAT_FAMILY, TABLES, TABLES_BY_NAME
from warehouse.settings import SinkSettings
from warehouse.sink import Sink
from warehouse.status import status_path


class _LosesFirstRow:
    """A connection that registers a parent batch without its first row: what DuckDB stored for
    chats once (7 of 8 rows, the INSERT raising nothing), reproduced on purpose."""

    def __init__(self, con: duckdb.DuckDBPyConnection, parent: str) -> None:
        self._con = con
        self._parent = parent

    def register(self, name: str, table: pa.Table) -> Any:
        if name == "_batch_rows" and table.schema.names == TABLES_BY_NAME[self._parent].column_names:
            table = table.slice(1)
        return self._con.register(name, table)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return int(run(con, f"SELECT count(*) FROM {table}")[0][0])


@pytest.mark.parametrize("family", [CALL_FAMILY, CHAT_FAMILY], ids=lambda f: f.name)
def test_a_batch_is_stored_whole_and_a_repeat_replaces_it(warehouse_db, family_batch, family):
    tables = family_batch(family, 8)
    for seq in (1, 2):  # the second load of the same keys replaces the first
        run(warehouse_db, "BEGIN TRANSACTION")
        written = replace_rows(warehouse_db, family, tables, seq)
        assert written.inserted == {n: t.num_rows for n, t in tables.items() if t.num_rows}
        assert written.deleted == ({} if seq == 1 else written.inserted)
        run(warehouse_db, "COMMIT")
    for t in family.tables:
        assert _count(warehouse_db, t.name) == tables[t.name].num_rows
        assert run(warehouse_db, f"SELECT DISTINCT _load_seq FROM {t.name}") == [(2,)]


@pytest.mark.parametrize("family", [CALL_FAMILY, CHAT_FAMILY], ids=lambda f: f.name)
def test_an_insert_that_stores_fewer_rows_than_the_batch_fails_before_the_commit(warehouse_db, family_batch, family):
    tables = family_batch(family, 8)
    lossy: Any = _LosesFirstRow(warehouse_db, family.parent.name)
    run(warehouse_db, "BEGIN TRANSACTION")
    with pytest.raises(
        WarehouseError,
        match=rf"load 1 into {family.parent.name}: the batch holds 8 rows, "
        r"the INSERT reported 7 and the table holds 7",
    ):
        replace_rows(lossy, family, tables, 1)
    run(warehouse_db, "ROLLBACK")  # what Sink._write does with any error before COMMIT
    for t in family.tables:
        assert _count(warehouse_db, t.name) == 0


class _LosesAtCommit:
    """A connection whose COMMIT stores the transaction without the table's first row."""

    def __init__(self, con: duckdb.DuckDBPyConnection, table: str) -> None:
        self._con = con
        self._table = table

    def execute(self, query: str, params: Any = None) -> Any:
        if query == "COMMIT":
            self._con.execute(
                f"DELETE FROM {self._table} WHERE rowid = (SELECT min(rowid) FROM {self._table})"
            ).fetchall()
        return self._con.execute(query, params) if params is not None else self._con.execute(query)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def test_a_row_lost_in_the_commit_stops_the_sink_and_the_ledger_has_the_load_for_the_next_start(tmp_path, family_batch):
    cfg = SinkSettings(
        kafka_bootstrap="127.0.0.1:1",
        topic_prefix="t",
        warehouse=str(tmp_path / "w.duckdb"),
        parquet_dir=str(tmp_path / "parquet"),
    )
    chats = topic("t", CHAT_FAMILY.topic_suffix)
    sink = Sink(cfg)
    try:
        real = sink.con
        sink.con = _LosesAtCommit(real, "chats")  # type: ignore[assignment]
        batch = Batch({chats: family_batch(CHAT_FAMILY, 8)}, {(chats, 0): 0}, {(chats, 0): 8}, records=8)
        with pytest.raises(
            WarehouseError,
            match=r"load 1 into chats: 8 rows inserted, but the table holds 7 after "
            r"COMMIT; stopping, the next start reloads this load from Kafka",
        ):
            sink._write(batch)
        assert ledger.check(real) == [ledger.Mismatch("chats", 1, expected=8, stored=7)]
        assert ledger.rewind_points(real, {1}) == {(chats, 0): 0}
    finally:
        sink.close()


def _sink(tmp_path, checkpoint_seconds: float = 30.0) -> Sink:
    return Sink(
        SinkSettings(
            kafka_bootstrap="127.0.0.1:1",
            topic_prefix="t",
            warehouse=str(tmp_path / "w.duckdb"),
            parquet_dir=str(tmp_path / "parquet"),
            checkpoint_seconds=checkpoint_seconds,
        )
    )


def test_the_status_file_counts_follow_each_load(tmp_path, family_batch):
    calls = topic("t", CALL_FAMILY.topic_suffix)
    sink = _sink(tmp_path)
    try:
        first = family_batch(CALL_FAMILY, 8)
        for seq, tables in enumerate((first, family_batch(CALL_FAMILY, 5, offset=8), first), 1):
            sink._write(Batch({calls: tables}, {(calls, 0): seq * 10}, {(calls, 0): seq * 10 + 8}, records=8))
            sink._write_status(force=True)
            status = orjson.loads(status_path(sink.cfg.warehouse).read_bytes())
            assert status["tables"] == {t.name: _count(sink.con, t.name) for t in TABLES}, seq
        assert status["tables"]["calls"] == 13
    finally:
        sink.close()


def test_the_ledger_is_trimmed_while_the_sink_runs_and_a_start_checks_only_what_followed(tmp_path, family_batch):
    calls = topic("t", CALL_FAMILY.topic_suffix)
    sink = _sink(tmp_path, checkpoint_seconds=0)
    try:
        for seq in range(1, 4):
            sink._write(Batch({calls: family_batch(CALL_FAMILY, 4, offset=seq * 4)}, {(calls, 0): seq * 4}, {}, 4))
            sink._trim_ledger()
        assert run(sink.con, "SELECT count(*) FROM _callstream_loads") == [(0,)]
        assert run(sink.con, "SELECT count(*) FROM _callstream_load_offsets") == [(0,)]
        assert ledger.base(sink.con) == 3 == ledger.last_seq(sink.con)
        sink._write(Batch({calls: family_batch(CALL_FAMILY, 4, offset=40)}, {(calls, 0): 40}, {(calls, 0): 44}, 4))
        assert run(sink.con, "SELECT DISTINCT seq FROM _callstream_loads") == [(4,)]
        # A row of load 4 lost where the check after its COMMIT did not see it: the next trim does
        # not forget load 4 but stops the sink, and the start-up check finds load 4, and only it.
        run(sink.con, "DELETE FROM calls WHERE rowid = (SELECT max(rowid) FROM calls)")
        with pytest.raises(WarehouseError, match=r"load 4 in calls: 3 rows stored, the ledger says 4; stopping"):
            sink._trim_ledger()
        assert ledger.check(sink.con) == [ledger.Mismatch("calls", 4, expected=4, stored=3)]
    finally:
        sink.close()
