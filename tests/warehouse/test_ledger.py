"""Unit tests of the load ledger (no Kafka): counts kept through replacements, and a load that is
short after a restart undone and its offsets moved back, so the sink reloads it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from tests.support.audit import restart_state, stored_offsets
from warehouse import ledger
from warehouse.db import run, scalar
from warehouse.load import Batch, replace_rows, write_batch
from warehouse.migrations import create_all, migrate
from warehouse.schema import CALL_FAMILY, CHAT_FAMILY, TABLES, Family

CALLS_TOPIC, CHATS_TOPIC = "t.call_analyzed", "t.chat_analyzed"
TOPIC = {CALL_FAMILY.name: CALLS_TOPIC, CHAT_FAMILY.name: CHATS_TOPIC}


def load(con: duckdb.DuckDBPyConnection, seq: int, batch: dict[Family, tuple[dict[str, pa.Table], int, int]]) -> None:
    """One batch as the sink writes it. `batch` maps a family to its tables and the first and next
    offset it read (partition 0)."""
    write_batch(
        con,
        {TOPIC[f.name]: f for f in batch},
        Batch(
            tables={TOPIC[f.name]: tables for f, (tables, _, _) in batch.items()},
            first_offsets={(TOPIC[f.name], 0): first for f, (_, first, _) in batch.items()},
            next_offsets={(TOPIC[f.name], 0): nxt for f, (_, _, nxt) in batch.items()},
            records=0,
        ),
        seq,
    )


def offsets(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return dict(run(con, "SELECT topic, next_offset FROM _callstream_offsets"))  # type: ignore[arg-type]


def no_low_watermark(topic: str, partition: int) -> int:
    return 0


@pytest.fixture
def loaded(warehouse_db: duckdb.DuckDBPyConnection, family_batch: Callable[..., dict[str, pa.Table]]) -> Any:
    """Three loads: calls and chats at offsets 0-7, then 8-15, then a repeat of the first calls at 16-23."""
    first_calls = family_batch(CALL_FAMILY, 8)
    load(warehouse_db, 1, {CALL_FAMILY: (first_calls, 0, 8), CHAT_FAMILY: (family_batch(CHAT_FAMILY, 8), 0, 8)})
    load(
        warehouse_db,
        2,
        {
            CALL_FAMILY: (family_batch(CALL_FAMILY, 8, offset=8), 8, 16),
            CHAT_FAMILY: (family_batch(CHAT_FAMILY, 8, offset=8), 8, 16),
        },
    )
    load(warehouse_db, 3, {CALL_FAMILY: (first_calls, 16, 24)})
    return warehouse_db


def test_replacements_keep_the_ledger_equal_to_the_tables(loaded):
    assert ledger.check(loaded) == []
    # Load 3 replaced every row of load 1's calls, so the ledger holds none of them there any more.
    assert run(loaded, "SELECT live_rows FROM _callstream_loads WHERE seq = 1 AND table_name = 'calls'") == [(0,)]
    assert run(loaded, "SELECT live_rows FROM _callstream_loads WHERE seq = 3 AND table_name = 'calls'") == [(8,)]


def test_a_load_short_after_a_restart_is_undone_and_its_offsets_move_back(loaded, tmp_path: Path):
    # What DuckDB's WAL replay once gave: a load's first chat missing, its messages all there.
    chat_id = scalar(loaded, "SELECT chat_id FROM chats WHERE _load_seq = 2 ORDER BY kafka_offset LIMIT 1")
    run(loaded, "DELETE FROM chats WHERE chat_id = ?", [chat_id])
    assert scalar(loaded, "SELECT count(*) FROM chat_messages WHERE chat_id = ?", [chat_id]) > 0
    before = offsets(loaded)

    found = ledger.verify_and_repair(loaded, 3, no_low_watermark)

    assert found == [ledger.Mismatch("chats", 2, expected=8, stored=7)]
    for t in TABLES:  # load 2 is gone from every table, the children of the missing chat too
        assert scalar(loaded, f"SELECT count(*) FROM {t.name} WHERE _load_seq = 2") == 0
    assert scalar(loaded, "SELECT count(*) FROM calls WHERE _load_seq = 3") == 8
    # Load 2 began reading both topics at offset 8: the sink reads from there again.
    assert offsets(loaded) == {CALLS_TOPIC: 8, CHATS_TOPIC: 8} != before
    # Its Parquet parts are rewritten at the next publish.
    assert sorted(run(loaded, "SELECT DISTINCT family, part_seq FROM _callstream_dirty WHERE part_seq = 2")) == [
        ("calls", 2),
        ("chats", 2),
    ]
    # Checked and checkpointed: the ledger starts after load 3, and the next start finds nothing.
    assert ledger.base(loaded) == 3 and ledger.last_seq(loaded) == 3
    assert scalar(loaded, "SELECT count(*) FROM _callstream_loads") == 0
    assert ledger.check(loaded) == []


def test_rows_the_ledger_does_not_know_are_undone_too(loaded):
    run(loaded, "INSERT INTO chat_messages SELECT * FROM chat_messages WHERE _load_seq = 1 LIMIT 1")
    found = ledger.verify_and_repair(loaded, 3, no_low_watermark)
    assert [(m.table, m.seq, m.stored - m.expected) for m in found] == [("chat_messages", 1, 1)]
    assert offsets(loaded) == {CALLS_TOPIC: 0, CHATS_TOPIC: 0}


def test_a_load_kafka_no_longer_holds_stops_the_sink_and_changes_nothing(loaded):
    run(loaded, "DELETE FROM call_utterances WHERE _load_seq = 2 AND turn = 0")
    before = offsets(loaded), scalar(loaded, "SELECT count(*) FROM calls")
    with pytest.raises(
        ledger.LedgerError,
        match=r"load 2 in call_utterances: \d+ rows stored, the ledger says \d+\. "
        r"Reloading needs offsets that Kafka no longer holds: "
        r"t\.call_analyzed\[0\]@8, t\.chat_analyzed\[0\]@8",
    ):
        ledger.verify_and_repair(loaded, 3, lambda topic, partition: 10)
    assert (offsets(loaded), scalar(loaded, "SELECT count(*) FROM calls")) == before


def test_a_warehouse_from_before_the_ledger_starts_it_after_its_last_load(tmp_path: Path, family_batch):
    con = duckdb.connect(str(tmp_path / "old.duckdb"))
    create_all(con)
    for t in ("_callstream_loads", "_callstream_load_offsets", "_callstream_ledger_base"):
        run(con, f"DROP TABLE {t}")
    run(con, "BEGIN TRANSACTION")
    replace_rows(con, CALL_FAMILY, family_batch(CALL_FAMILY, 4), 5)
    run(con, "COMMIT")
    migrate(con)  # a file of the first release, from before the ledger and the schema version
    assert ledger.base(con) == 5
    assert ledger.check(con) == []
    con.close()


def test_the_crash_audit_sees_the_database_as_the_next_start_leaves_it(loaded, tmp_path: Path):
    db = tmp_path / "w.duckdb"
    run(loaded, "DELETE FROM chats WHERE _load_seq = 2 AND kafka_offset = 8")
    loaded.close()
    owed: dict[tuple[str, int], int] = {}
    with pytest.warns(UserWarning, match=r"reloads short loads: load 2 in chats: 7 rows stored, the ledger says 8"):
        seen, offsets, strict = restart_state(db, owed)
    assert seen != db and offsets == stored_offsets(seen) == {(CALLS_TOPIC, 0): 8, (CHATS_TOPIC, 0): 8}
    assert stored_offsets(db) == {(CALLS_TOPIC, 0): 24, (CHATS_TOPIC, 0): 16}  # the original is left alone
    # Until the sink has read up to where it was, keys are not compared with the offsets.
    assert not strict and owed == {(CALLS_TOPIC, 0): 24, (CHATS_TOPIC, 0): 16}
    assert restart_state(seen, owed)[2] is False
    with duckdb.connect(str(seen)) as con:  # the sink has read that far again
        run(con, "UPDATE _callstream_offsets SET next_offset = next_offset + 16")
    assert restart_state(seen, owed) == (seen, {(CALLS_TOPIC, 0): 24, (CHATS_TOPIC, 0): 24}, True)
    assert owed == {}
