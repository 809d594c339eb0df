"""The read path: one call's rows through `<table>_of(key)`, which opens the files of its day only."""

from __future__ import annotations

from pathlib import Path

import duckdb
import orjson

from callstream.fakecalls import CallFactory, Fleet
from tests.support.parquet import DAY_MS, T0, load_calls
from warehouse.migrations import migrate
from warehouse.parquet import ParquetPublisher
from warehouse.read import connect

DAYS = 6


def _files_read(con: duckdb.DuckDBPyConnection, sql: str, params: list, tmp: Path, table: str) -> int:
    """How many files of `table` the query opened, from DuckDB's profile of it."""
    out = tmp / "profile.json"
    con.execute("SET enable_profiling = 'json'")
    con.execute(f"SET profiling_output = '{out}'")
    con.execute(sql, params).fetchall()
    con.execute("RESET enable_profiling")

    def scans(node: dict) -> list[dict]:
        return [node.get("extra_info", {}), *(s for c in node.get("children", []) for s in scans(c))]

    infos = [i for op in orjson.loads(out.read_bytes())["operator"] for i in scans(op)]
    return sum(int(i["Total Files Read"]) for i in infos if f"/{table}/" in str(i.get("Filename(s)", "")))


def test_one_call_s_rows_come_from_the_files_of_its_day(tmp_path: Path):
    db = duckdb.connect(str(tmp_path / "w.duckdb"))
    migrate(db)
    pub = ParquetPublisher(db, tmp_path / "parquet")
    factory = CallFactory(Fleet(seed=47), seed=47, turns=(3, 5))
    bodies = [factory.events("completed", now_ms=T0 + (i % DAYS) * DAY_MS)[-1].body() for i in range(4 * DAYS)]
    for seq in range(1, 5):
        load_calls(db, seq, bodies[(seq - 1) * DAYS : seq * DAYS])
        pub.publish()
    # A call delivered again on another day: its old day's parts are rewritten without it.
    moved = orjson.loads(bodies[0])
    moved["call"]["start_timestamp"] += 2 * DAY_MS
    moved["call"]["end_timestamp"] += 2 * DAY_MS
    load_calls(db, 5, [orjson.dumps(moved)])
    pub.publish()

    reader = connect(pub.root)
    files = list((pub.root / "call_utterances").glob("day=*/*.parquet"))
    for body in (bodies[1], bodies[DAYS + 2], orjson.dumps(moved)):
        call_id = orjson.loads(body)["call"]["call_id"]
        for table in ("calls", "call_utterances", "call_tool_calls"):
            plain = f"SELECT * FROM {table} WHERE call_id = ? ORDER BY ALL"
            want = db.execute(
                f"SELECT * EXCLUDE (_load_seq{', _key_hash' if table == 'calls' else ''}) FROM {table} "
                "WHERE call_id = ? ORDER BY ALL",
                [call_id],
            ).fetchall()
            assert reader.execute(plain, [call_id]).fetchall() == want, table
            assert reader.execute(f"SELECT * FROM {table}_of(?) ORDER BY ALL", [call_id]).fetchall() == want, table
        plain = "SELECT * FROM call_utterances WHERE call_id = ?"
        assert _files_read(reader, plain, [call_id], tmp_path, "call_utterances") == len(files)
        # The moved call's old day is named in call_days too (a stale entry costs one more day's files).
        days = reader.execute("SELECT DISTINCT day FROM call_days WHERE call_id = ?", [call_id]).fetchall()
        assert len(days) == (2 if body == orjson.dumps(moved) else 1)
        in_days = sum(len(list((pub.root / "call_utterances" / f"day={d}").glob("*.parquet"))) for (d,) in days)
        lookup = "SELECT * FROM call_utterances_of(?)"
        assert _files_read(reader, lookup, [call_id], tmp_path, "call_utterances") == in_days < len(files)
    assert reader.execute("SELECT count(*) FROM call_days").fetchall() == [(len(bodies) + 1,)]
    assert reader.execute("SELECT * FROM chats_of('none')").fetchall() == []
