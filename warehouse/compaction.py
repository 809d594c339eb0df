"""Merging a day's Parquet parts, so parts per day stay few however long the sink runs.

Three merges, each from the parts' files into one new part, under the folder's lock, as one
change (`warehouse.parquet_folder`): readers of older snapshots keep their files for the retention.

- after each publish, by size tiers: when the newest TIER parts of a day are of one tier (rows
  within a factor of TIER), they become one, their rows one after the other (DuckDB streams them).
  A row is rewritten about once per tier, and a day keeps under TIER parts per tier (some 25 for a
  day of two-second publishes);
- after each publish, one quiet day (no file written for QUIET_SECONDS) whose parts are several,
  or not sorted, becomes one part sorted by key (`warehouse.sorted_parts`, in bounded memory), so
  a past day is one file per table, and a reader of one call reads one row group of it;
- `callstream warehouse compact`: the same for every day, now.

Merged parts keep the rule that a part (lo, hi] holds its day's rows of loads lo < seq <= hi: the
parts merged are neighbours in load order, so no other part of the day lies inside the new range.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import duckdb

from warehouse.parquet_folder import Key, ParquetFolder, Part, Staged, Stored, Writes
from warehouse.schema import KEY_DAYS_BY_NAME, TABLES_BY_NAME
from warehouse.sorted_parts import copy_parquet, write_sorted

log = logging.getLogger(__name__)

TIER = 4
QUIET_SECONDS = 600.0


@dataclass
class CompactStats:
    days: int = 0
    files_merged: int = 0
    files_deleted: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"merged {self.files_merged} files into {self.days} (one per table and day), "
            f"deleted {self.files_deleted} retired files, in {self.seconds:.1f}s"
        )


def _tier(rows: int) -> int:
    return int(math.log(max(rows, 1), TIER) + 1e-9)


def _tier_run(parts: dict[Part, Stored]) -> list[Part]:
    """The newest parts of one tier when there are TIER of them, else none."""
    ordered = sorted(parts)
    if len(ordered) < TIER:
        return []
    tier = _tier(parts[ordered[-1]].rows)
    run: list[Part] = []
    for p in reversed(ordered):
        if _tier(parts[p].rows) != tier:
            break
        run.append(p)
    return sorted(run) if len(run) >= TIER else []


def _quiet_day(folder: ParquetFolder, day: str, now_ns: int) -> bool:
    """No file of the day was written in the last QUIET_SECONDS."""
    written = (s.written_ns for (_, d), parts in folder.parts.items() if d == day for s in parts.values())
    return now_ns - max(written) > QUIET_SECONDS * 1e9


def _unmerged(parts: dict[Part, Stored]) -> bool:
    """Several parts, or one not sorted by key: what a day's last merge leaves differently."""
    return len(parts) > 1 or not all(s.by_key for s in parts.values())


def merge_tiers(folder: ParquetFolder, keys: Iterable[Key], compression: str, con: duckdb.DuckDBPyConnection) -> int:
    """After a publish, holding the lock: merge tiers of the days it touched, and one quiet day
    (not among them) into one part. Returns the files written or removed."""
    changed = 0
    keys = set(keys)
    for key in sorted(keys):
        while run := _tier_run(folder.parts.get(key, {})):
            changed += merge(folder, key, run, compression, con, sort=False)
    touched, now = {day for _, day in keys}, time.time_ns()
    several = sorted((day, table) for (table, day), parts in folder.parts.items() if _unmerged(parts))
    quiet = next((day for day, _ in several if day not in touched and _quiet_day(folder, day, now)), None)
    for day, table in several:
        if day == quiet:
            changed += merge(folder, (table, day), sorted(folder.parts[(table, day)]), compression, con)
    return changed


def merge(
    folder: ParquetFolder,
    key: Key,
    parts: list[Part],
    compression: str,
    con: duckdb.DuckDBPyConnection,
    sort: bool = True,
) -> int:
    """Merge neighbouring `parts` of one table and day into one part, sorted by the table's key
    unless not `sort` (then the rows follow each other as they were); return the files written or
    removed. Hold the lock."""
    table, day = key
    merged = Part(parts[0].lo, parts[-1].hi)
    tmp = folder.staging(table, day, merged)
    files = ", ".join(_quote(folder.store(table, day) / folder.parts[key][p].name) for p in parts)
    order = TABLES_BY_NAME[table].key if table in TABLES_BY_NAME else (KEY_DAYS_BY_NAME[table].key,)
    query = f"SELECT * FROM read_parquet([{files}], hive_partitioning = false, union_by_name = true)"
    if sort:
        rows = write_sorted(con, query, order, tmp, compression, folder.scratch)
    else:
        rows = copy_parquet(con, query, tmp, compression)
    writes: Writes = {(table, day, p): None for p in parts}
    writes[(table, day, merged)] = Staged(tmp, rows, by_key=sort) if rows else None
    if not rows:
        tmp.unlink(missing_ok=True)
    folder.commit(writes)
    return len(writes)


def compact(
    root: Path,
    retention_seconds: float,
    compression: str,
    memory_limit: str = "256MB",
    say: Callable[[str], None] = log.info,
) -> CompactStats:
    """Every day with several parts becomes one part per table; then delete what has been retired
    longer than the retention. Safe while the sink runs and readers read: a day at a time under the
    folder's lock, so the sink's publisher waits for at most one day's merge."""
    t0 = time.monotonic()
    stats = CompactStats()
    folder = ParquetFolder(root, retention_seconds)
    tmp = root / ".compact-tmp"
    con = duckdb.connect(":memory:", config={"memory_limit": memory_limit, "temp_directory": str(tmp)})
    try:
        with folder.locked():
            todo = sorted(k for k, parts in folder.parts.items() if _unmerged(parts))
        for i, key in enumerate(todo, 1):
            with folder.locked():
                parts = sorted(folder.parts.get(key, {}))
                if _unmerged(folder.parts.get(key, {})):
                    merge(folder, key, parts, compression, con)
                    stats.days += 1
                    stats.files_merged += len(parts)
            if i % 50 == 0 or i == len(todo):
                say(f"compact: {i}/{len(todo)} table-days")
        with folder.locked():
            stats.files_deleted = folder.expire()
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    stats.seconds = time.monotonic() - t0
    return stats


def _quote(p: Path) -> str:
    return "'" + str(p).replace("'", "''") + "'"
