"""Publishing the tables as hive-partitioned Parquet, with consistent snapshots for readers.

The folder's layout, its snapshots and their expiry are `warehouse.parquet_folder`'s. Every row
carries `_load_seq`, the sequence number of the batch that loaded it (in DuckDB only). A publish
writes one new part per table and day with the rows loaded since the last publish, so its cost
follows the new rows, not the size of the day or of the history; every query it runs names those
loads, or the loads of the parts it rewrites, so zone maps skip the rest of the tables. A call
loaded again replaces its old row in DuckDB; the publish rewrites the part that held the old row
(as a new file, without it), so no live file keeps a replaced row. After a publish, a day's parts
are merged by size tiers, and a quiet day becomes one part sorted by key (`warehouse.compaction`).
Each publish also writes a part of `call_days`/`chat_days` (key -> day) for the loads it covers.

The publisher runs in its own thread with its own DuckDB cursor: its read transaction sees a committed
state while the loader goes on writing. Replaced rows are recorded in `_callstream_dirty` in the same
transaction as the data, so a crash before a publish only means the next publish does it. A part
whose sequence range lies inside another part's is a leftover of an interrupted publish and is
deleted, so after a crash the next publish leaves exactly one copy of every row.

To rewrite parts after deleting rows in DuckDB (as a replacement does): insert their (family, day,
_load_seq) into `_callstream_dirty` in the deleting transaction, then `publish()`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import duckdb

from warehouse.compaction import merge_tiers
from warehouse.db import run
from warehouse.errors import WarehouseError
from warehouse.parquet_folder import (
    ParquetFolder,
    Part,
    Snapshot,
    Staged,
    Writes,
    current_snapshot,
    parts_of,
    snapshot_files,
)
from warehouse.schema import FAMILIES, KEY_DAYS, KEY_DAYS_BY_NAME, TABLES, TABLES_BY_NAME, last_load_seq
from warehouse.sorted_parts import copy_parquet

__all__ = ["ParquetPublisher", "Part", "Snapshot", "current_snapshot", "parts_of", "snapshot_files"]

log = logging.getLogger(__name__)

_FAMILIES = {f.name: f for f in FAMILIES}
COMPRESSIONS = ("zstd", "snappy", "gzip", "lz4", "uncompressed")


@dataclass(frozen=True, slots=True)
class _Plan:
    """One round's outcome before it is applied: the staged files and the loads they cover."""

    high: int  # every load up to this one is in the files once applied
    max_seq: int  # the newest dirty entry the round covers
    writes: Writes


class ParquetPublisher:
    """Writes new rows and rewrites parts with replaced rows, on a timer; each round is a snapshot."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        root: Path,
        min_interval: float = 2.0,
        retention_seconds: float = 600.0,
        compression: str = "zstd",
    ) -> None:
        if compression not in COMPRESSIONS:
            raise WarehouseError(f"parquet compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
        self.compression = compression
        self.root = root
        self.min_interval = min_interval
        self.folder = ParquetFolder(root, retention_seconds)
        self._con = con
        self._cur: duckdb.DuckDBPyConnection | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.done_seq = 0  # every dirty entry with seq <= this is published
        self.rounds = 0
        self.last_duration = 0.0
        self.last_published_at: float | None = None
        self.error: BaseException | None = None
        with self.folder.locked():  # cleans up what an interrupted publish left
            pass

    def published_seq(self) -> int:
        return self.folder.published_seq()

    @contextlib.contextmanager
    def between_rounds(self) -> Iterator[bool]:
        """Keep the publisher from starting a round while the block runs; yields False, without
        waiting, when a round is under way (its read transaction would make a CHECKPOINT fail)."""
        if not self._lock.acquire(blocking=False):
            yield False
            return
        try:
            yield True
        finally:
            self._lock.release()

    # -- the thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="parquet-publisher", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """New rows were committed."""
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(timeout=1.0)
                if self._stop.is_set():
                    break
                # Wait at least twice the last round, so publishing takes at most a third of the time.
                since = time.monotonic() - (self.last_published_at or 0.0)
                pause = max(self.min_interval, 2 * self.last_duration) - since
                if pause > 0 and self._stop.wait(pause):
                    break
                self._wake.clear()
                self.publish()
        except BaseException as exc:  # the loader checks `error` and stops with it
            log.exception("parquet publisher failed")
            self.error = exc

    def stop(self, final: bool = True) -> None:
        """Stop the thread; with `final`, publish once more so Parquet matches the tables."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if final and self.error is None:
            self.publish()
        if self._cur is not None:
            self._cur.close()
            self._cur = None

    # -- one round -----------------------------------------------------------------------------

    def _copy(self, cur: duckdb.DuckDBPyConnection, name: str, day: date | None, part: Part, tmp: Path) -> int:
        """Write the rows of a part (of a key-days index when `day` is None) to `tmp`, sorted by key."""
        loads = f"_load_seq > {part.lo} AND _load_seq <= {part.hi}"
        order: tuple[str, ...]
        if day is None:
            index = KEY_DAYS_BY_NAME[name]
            query, order = f"SELECT {index.key}, day FROM {index.parent.name} WHERE {loads}", (index.key,)
        else:
            table = TABLES_BY_NAME[name]
            cols = ", ".join(c for c in table.column_names if c != "day")
            query, order = f"SELECT {cols} FROM {name} WHERE day = DATE '{day.isoformat()}' AND {loads}", table.key
        del order  # new parts are written as DuckDB holds them; a quiet day's merge sorts them
        return copy_parquet(cur, query, tmp, self.compression)

    def publish(self) -> int:
        """Publish what changed since the last round as a snapshot; return the files written or removed."""
        with self._lock, self.folder.locked():
            t0 = time.monotonic()
            if self._cur is None:
                self._cur = self._con.cursor()
            plan = self._plan(self._cur, self.folder.published_seq())
            if plan is None:
                return 0
            self.folder.commit(plan.writes, plan.high)
            changed = len(plan.writes)
            changed += merge_tiers(self.folder, {(t, d) for t, d, _ in plan.writes}, self.compression, self._cur)
            self.done_seq = max(self.done_seq, plan.max_seq)
            self.rounds += 1
            self.last_duration = time.monotonic() - t0
            self.last_published_at = time.monotonic()
            log.debug("published %d files up to load %d in %.2fs", changed, plan.high, self.last_duration)
            return changed

    def _plan(self, cur: duckdb.DuckDBPyConnection, low: int) -> _Plan | None:
        """In one read transaction: which parts change, each staged under a hidden name (None: nothing
        to publish). A failure removes what was staged."""
        writes: Writes = {}
        run(cur, "BEGIN TRANSACTION")
        try:
            high = last_load_seq(cur, [f.parent for f in FAMILIES], above=low)
            dirty = run(
                cur,
                "SELECT family, day, part_seq, max(seq) FROM _callstream_dirty WHERE seq > ? GROUP BY ALL",
                [self.done_seq],
            )
            if high == low and not dirty:
                run(cur, "COMMIT")
                return None
            new = Part(low, high)
            self._stage(cur, self._touched(cur, new, dirty), new, writes)
            max_seq = max((int(s) for *_, s in dirty), default=self.done_seq)
            run(cur, "COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                run(cur, "ROLLBACK")
            for staged in writes.values():
                if staged is not None:
                    staged.path.unlink(missing_ok=True)
            raise
        return _Plan(high, max_seq, writes)

    def _touched(
        self, cur: duckdb.DuckDBPyConnection, new: Part, dirty: list[tuple[Any, ...]]
    ) -> dict[tuple[str, date | None], set[Part]]:
        """(table, day) -> the parts to write: the new loads' part, and the parts that held replaced rows.
        A key-days index (day None) gets the new loads' part only: an entry of a replaced row is
        left, and costs a reader of that key one more day's files to look in."""
        touched: dict[tuple[str, date | None], set[Part]] = {}
        if new.hi > new.lo:
            for table in TABLES:
                for (day,) in run(cur, f"SELECT DISTINCT day FROM {table.name} WHERE _load_seq > ?", [new.lo]):
                    touched.setdefault((table.name, day), set()).add(new)
            for index in KEY_DAYS:
                if any(name == index.parent.name for name, _ in touched):
                    touched[(index.name, None)] = {new}
        for family_name, day, part_seq, _ in dirty:
            for table in _FAMILIES[family_name].tables:
                for p in self.folder.parts.get((table.name, day.isoformat()), {}):
                    if p.holds(int(part_seq)):
                        touched.setdefault((table.name, day), set()).add(p)
        return touched

    def _stage(
        self,
        cur: duckdb.DuckDBPyConnection,
        touched: dict[tuple[str, date | None], set[Part]],
        new: Part,
        writes: Writes,
    ) -> None:
        """Copy each touched part's rows to a hidden file (None: the part has no rows any more). Parts
        inside the new one are leftovers of an interrupted publish: the new part holds their rows."""
        for (name, day), parts in touched.items():
            iso = day.isoformat() if day is not None else ""
            for p in self.folder.parts.get((name, iso), {}):
                if p.inside(new):
                    writes[(name, iso, p)] = None
            for p in parts:
                tmp = self.folder.staging(name, iso, p)
                rows = self._copy(cur, name, day, p, tmp)
                writes[(name, iso, p)] = Staged(tmp, rows) if rows else None
                if not rows:
                    tmp.unlink(missing_ok=True)
