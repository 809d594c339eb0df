"""The load ledger: how many rows each load left in each table, and which offsets it read.

Every batch writes, in its own transaction, a row per table with the number of rows it inserted,
and the first offset it read from each partition; a later batch that replaces rows takes them off
the count of the load that wrote them. So for every load the ledger says how many rows the tables
must hold.

Why keep it: DuckDB once committed a batch whose WAL record held 7 of the 8 `chats` rows it was
given (all their child rows were there, no error was raised). The sink's count before COMMIT
catches an INSERT that stores too few rows; it cannot catch a WAL record shorter than the live
table, which only shows after a crash, when DuckDB replays that record. So at start, after the
replay, the sink compares the tables with the ledger. A load whose rows differ is undone (its rows
deleted, its Parquet parts marked for rewriting) and the stored offsets move back to where it began
reading, so it is loaded again from Kafka; repeated deliveries replace rows, so nothing doubles.

Only loads since the last CHECKPOINT need this: a checkpoint writes the tables, as the sink's
checks before and after each COMMIT saw them, into the database file, and the WAL no longer
matters for them. So at start, once the tables agree with the ledger, and every
`checkpoint_seconds` (30) while the sink runs, it checkpoints and the ledger forgets the loads up to
then (it keeps the highest load number, so load numbers never repeat). The ledger stays a few
hundred rows however long the sink runs, and the start-up check reads only the loads since.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from warehouse.db import insert_rows, run, scalar, transaction
from warehouse.errors import WarehouseError
from warehouse.schema import FAMILIES, TABLES, Family, Table, last_load_seq

log = logging.getLogger(__name__)

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS _callstream_loads (
  seq BIGINT NOT NULL,
  table_name VARCHAR NOT NULL,
  live_rows BIGINT NOT NULL
)
"""
# Where each load began reading each partition: where a reload must start.
LOAD_OFFSETS_DDL = """
CREATE TABLE IF NOT EXISTS _callstream_load_offsets (
  seq BIGINT NOT NULL,
  topic VARCHAR NOT NULL,
  kafka_partition INTEGER NOT NULL,
  first_offset BIGINT NOT NULL
)
"""
# Loads up to `seq` are checkpointed and no longer in the ledger.
BASE_DDL = "CREATE TABLE IF NOT EXISTS _callstream_ledger_base (seq BIGINT NOT NULL)"


class LedgerError(WarehouseError):
    """The tables disagree with the ledger and the sink cannot reload what is missing."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One load whose rows in one table are not what the ledger says."""

    table: str
    seq: int
    expected: int
    stored: int

    def __str__(self) -> str:
        return f"load {self.seq} in {self.table}: {self.stored} rows stored, the ledger says {self.expected}"


def create(con: duckdb.DuckDBPyConnection) -> None:
    """Create the ledger's tables; a warehouse from before the ledger starts it after its last load."""
    run(con, LEDGER_DDL)
    run(con, LOAD_OFFSETS_DDL)
    run(con, BASE_DDL)
    if scalar(con, "SELECT count(*) FROM _callstream_ledger_base") == 0:
        run(con, "INSERT INTO _callstream_ledger_base VALUES (?)", [last_load_seq(con, TABLES)])


def base(con: duckdb.DuckDBPyConnection) -> int:
    return int(scalar(con, "SELECT max(seq) FROM _callstream_ledger_base") or 0)


def last_seq(con: duckdb.DuckDBPyConnection) -> int:
    """The highest load number the ledger has given out (loads forgotten at a start included)."""
    return max(base(con), int(scalar(con, "SELECT coalesce(max(seq), 0) FROM _callstream_loads") or 0))


def record(
    con: duckdb.DuckDBPyConnection, seq: int, rows: dict[str, int], first_offsets: dict[tuple[str, int], int]
) -> None:
    """In the batch's transaction: the rows it inserted per table and where it began reading."""
    insert_rows(con, "INSERT INTO _callstream_loads VALUES", [(seq, name, n) for name, n in rows.items()])
    insert_rows(
        con, "INSERT INTO _callstream_load_offsets VALUES", [(seq, t, p, o) for (t, p), o in first_offsets.items()]
    )


def note_replaced(con: duckdb.DuckDBPyConnection, table: Table, where: str) -> None:
    """In the batch's transaction, before deleting `table`'s rows matching `where`: the loads that
    wrote them hold that many rows fewer."""
    run(
        con,
        f"""
        UPDATE _callstream_loads l SET live_rows = l.live_rows - d.n
        FROM (SELECT _load_seq, count(*) AS n FROM {table.name} WHERE {where} GROUP BY _load_seq) d
        WHERE l.seq = d._load_seq AND l.table_name = ?""",
        [table.name],
    )


def check(con: duckdb.DuckDBPyConnection) -> list[Mismatch]:
    """Every load since the base whose rows in some table differ from the ledger."""
    since = base(con)
    found: list[Mismatch] = []
    for t in TABLES:
        rows = run(
            con,
            f"""
            SELECT coalesce(s._load_seq, l.seq), coalesce(l.live_rows, 0), coalesce(s.n, 0)
            FROM (SELECT _load_seq, count(*) AS n FROM {t.name} WHERE _load_seq > ? GROUP BY _load_seq) s
            FULL JOIN (SELECT seq, live_rows FROM _callstream_loads WHERE table_name = ? AND seq > ?) l
              ON s._load_seq = l.seq
            WHERE coalesce(l.live_rows, 0) <> coalesce(s.n, 0)
            ORDER BY 1""",
            [since, t.name, since],
        )
        found += [Mismatch(t.name, int(seq), int(want), int(n)) for seq, want, n in rows]
    return found


def rewind_points(con: duckdb.DuckDBPyConnection, seqs: set[int]) -> dict[tuple[str, int], int]:
    """Per partition, the earliest offset the given loads read: where reloading them begins."""
    rows = run(
        con,
        "SELECT seq, topic, kafka_partition, min(first_offset) FROM _callstream_load_offsets "
        f"WHERE seq IN ({', '.join(str(int(s)) for s in seqs)}) GROUP BY ALL",
    )
    unknown = seqs - {int(r[0]) for r in rows}
    if unknown:
        raise LedgerError(
            f"loads {sorted(unknown)} do not match the ledger, and it does not say which offsets they read, so "
            "they cannot be reloaded. Rebuild the warehouse from Kafka: move the database and the Parquet "
            "folder away and start the sink again."
        )
    points: dict[tuple[str, int], int] = {}
    for _, t, p, o in rows:
        points[(t, int(p))] = min(int(o), points.get((t, int(p)), int(o)))
    return points


def undo(con: duckdb.DuckDBPyConnection, seqs: set[int], rewind: dict[tuple[str, int], int]) -> None:
    """In one transaction: delete the loads' rows, mark their Parquet parts for rewriting, zero their
    ledger counts, and move the stored offsets back so the next run loads their records again."""
    in_seqs = f"IN ({', '.join(str(int(s)) for s in seqs)})"
    with transaction(con):
        for family in FAMILIES:
            _mark_dirty(con, family, in_seqs)
            for t in family.tables:
                run(con, f"DELETE FROM {t.name} WHERE _load_seq {in_seqs}")
        # Zero, not deleted: the ledger keeps the numbers it gave out until the next CHECKPOINT.
        run(con, f"UPDATE _callstream_loads SET live_rows = 0 WHERE seq {in_seqs}")
        run(con, f"DELETE FROM _callstream_load_offsets WHERE seq {in_seqs}")
        for (topic, p), o in rewind.items():
            run(
                con,
                "UPDATE _callstream_offsets SET next_offset = least(next_offset, ?) "
                "WHERE topic = ? AND kafka_partition = ?",
                [o, topic, p],
            )


def _mark_dirty(con: duckdb.DuckDBPyConnection, family: Family, in_seqs: str) -> None:
    # From every table of the family: the parent row may be the one that is missing.
    days = " UNION ".join(f"SELECT day, _load_seq FROM {t.name} WHERE _load_seq {in_seqs}" for t in family.tables)
    run(con, f"INSERT INTO _callstream_dirty SELECT DISTINCT ?, day, _load_seq, _load_seq FROM ({days})", [family.name])


def forget_checkpointed(con: duckdb.DuckDBPyConnection, last: int) -> bool:
    """CHECKPOINT, then drop the ledger's loads up to `last`: the database file holds them now, and no
    WAL replay can shorten them. The base keeps `last`, so load numbers never repeat. Returns False,
    forgetting nothing, when DuckDB refuses the CHECKPOINT (another transaction writes) or the WAL is
    not empty after it."""
    try:
        run(con, "CHECKPOINT")
    except duckdb.TransactionException:
        return False
    if _wal_bytes(con):
        return False
    with transaction(con):
        run(con, "DELETE FROM _callstream_ledger_base")
        run(con, "INSERT INTO _callstream_ledger_base VALUES (?)", [last])
        run(con, "DELETE FROM _callstream_loads WHERE seq <= ?", [last])
        run(con, "DELETE FROM _callstream_load_offsets WHERE seq <= ?", [last])
    return True


def _wal_bytes(con: duckdb.DuckDBPyConnection) -> int:
    path = scalar(con, "SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
    try:
        return os.path.getsize(f"{path}.wal") if path else 0
    except OSError:  # no WAL file: nothing to replay
        return 0


def repair(con: duckdb.DuckDBPyConnection, low_watermark: Callable[[str, int], int]) -> list[Mismatch]:
    """Undo every load the tables disagree with, so that the sink loads its records again; return
    what differed. Raises LedgerError, changing nothing, if Kafka no longer holds those records."""
    found = check(con)
    if found:
        seqs = {m.seq for m in found}
        rewind = rewind_points(con, seqs)
        gone = {tp: o for tp, o in rewind.items() if o < low_watermark(*tp)}
        if gone:
            raise LedgerError(
                f"{'; '.join(map(str, found))}. Reloading needs offsets that Kafka no longer holds: "
                + ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(gone.items()))
                + ". Rebuild the warehouse from what Kafka holds (move the database and the Parquet folder away), "
                "or restore them from a backup."
            )
        log.warning(
            "the tables differ from the load ledger (%s); reloading loads %s from %s",
            "; ".join(map(str, found)),
            sorted(seqs),
            ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(rewind.items())),
        )
        undo(con, seqs, rewind)
    return found


def verify_and_repair(
    con: duckdb.DuckDBPyConnection, last: int, low_watermark: Callable[[str, int], int]
) -> list[Mismatch]:
    """At start, after DuckDB replayed its WAL: repair, checkpoint, and forget the loads up to `last`."""
    found = repair(con, low_watermark)
    forget_checkpointed(con, last)
    return found
