"""Publishing the tables as hive-partitioned Parquet, and consistent snapshots of them for readers.

Layout under the Parquet folder:

    <table>/day=YYYY-MM-DD/part-<from>-<to>.parquet      the rows of that day loaded by batches from < seq <= to
    _snapshots/<generation>/<table>/day=.../part-*.parquet   hard links: every table as of one publish
    _snapshots/CURRENT                                   the newest generation's name
    _published.json                                      every batch up to this load sequence is in files

Every row carries `_load_seq`, the sequence number of the batch that loaded it (in DuckDB only). A
publish writes one new part per table and day with the rows loaded since the last publish, so its
cost follows the new rows, not the size of the day. A call loaded again replaces its old row in
DuckDB; the publish rewrites the part that held the old row (same name, without it), so no file keeps a
replaced row. When a day has many parts they are merged into one. Files are written under a hidden
name and renamed into place, so a reader never sees a half-written file. A part whose sequence range
lies inside another part's is a leftover of an interrupted publish and is deleted, so after a crash
the next publish leaves exactly one copy of every row.

Between two files' renames a reader of `<table>/**/*.parquet` can see one table newer than another,
so readers that join tables use a snapshot: a folder of hard links to the files of every table as of
one publish (no copy), named in CURRENT, kept for `snapshot_retention_seconds` after a newer one
exists. `warehouse.read.connect()` does that.

The publisher runs in its own thread with its own DuckDB cursor: its read transaction sees a committed
state while the loader goes on writing. Replaced rows are recorded in `_callstream_dirty` in the same
transaction as the data, so a crash before a publish only means the next publish does it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import orjson

from warehouse.db import run, scalar
from warehouse.errors import WarehouseError
from warehouse.schema import FAMILIES, TABLES, TABLES_BY_NAME, Table, last_load_seq

log = logging.getLogger(__name__)

SNAPSHOTS = "_snapshots"
CURRENT = "CURRENT"
PUBLISHED = "_published.json"
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
_FAMILIES = {f.name: f for f in FAMILIES}
# A day with more parts than this has them merged into one at the next publish.
MAX_PARTS_PER_DAY = 16


@dataclass(frozen=True, order=True, slots=True)
class Part:
    lo: int  # exclusive
    hi: int  # inclusive

    @property
    def name(self) -> str:
        return f"part-{self.lo:012d}-{self.hi:012d}.parquet"

    def holds(self, seq: int) -> bool:
        return self.lo < seq <= self.hi

    def inside(self, other: Part) -> bool:
        return self != other and other.lo <= self.lo and self.hi <= other.hi


@dataclass(frozen=True, slots=True)
class _Plan:
    """One round's outcome before it is applied: the staged files and the loads they cover."""

    high: int  # every load up to this one is in the files once applied
    max_seq: int  # the newest dirty entry the round covers
    writes: dict[tuple[Path, Part], Path | None]  # (folder, part) -> staged file, or None: remove


def day_dir(root: Path, table: str, day: date) -> Path:
    return root / table / f"day={day.isoformat()}"


def parts_of(folder: Path) -> list[Part]:
    out = []
    if folder.is_dir():
        for f in folder.iterdir():
            m = _PART.match(f.name)
            if m:
                out.append(Part(int(m.group(1)), int(m.group(2))))
    return sorted(out)


def current_snapshot(root: Path) -> Path | None:
    """The folder of the newest published snapshot, or None if nothing was published yet."""
    try:
        gen = (root / SNAPSHOTS / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return root / SNAPSHOTS / gen


def snapshot_files(snapshot: Path, table: str) -> list[Path]:
    return sorted((snapshot / table).glob("day=*/part-*.parquet"))


class ParquetPublisher:
    """Writes new rows and rewrites parts with replaced rows, on a timer; then publishes a snapshot."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        root: Path,
        min_interval: float = 2.0,
        retention_seconds: float = 600.0,
        compression: str = "zstd",
    ) -> None:
        if compression not in ("zstd", "snappy", "gzip", "lz4", "uncompressed"):
            raise WarehouseError(
                f"parquet compression {compression!r} is not one of zstd, snappy, gzip, lz4, uncompressed"
            )
        self.compression = compression
        self.root = root
        self.min_interval = min_interval
        self.retention = retention_seconds
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
        root.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    def published_seq(self) -> int:
        try:
            return int(orjson.loads((self.root / PUBLISHED).read_bytes())["load_seq"])
        except FileNotFoundError:
            return 0

    def _clean_leftovers(self) -> None:
        """Temporary files and parts covered by others: what an interrupted publish left behind."""
        for p in self.root.glob("*/day=*/.*.tmp"):
            p.unlink(missing_ok=True)
        for t in TABLES:
            for folder in (self.root / t.name).glob("day=*"):
                self._drop_covered(folder)
        snaps = self.root / SNAPSHOTS
        if snaps.exists():
            for p in snaps.glob(".*.tmp"):
                shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def _drop_covered(folder: Path) -> None:
        parts = parts_of(folder)
        for p in parts:
            if any(p.inside(o) for o in parts):
                (folder / p.name).unlink(missing_ok=True)

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

    def _copy(self, cur: duckdb.DuckDBPyConnection, table: Table, day: date, part: Part, tmp: Path) -> int:
        cols = ", ".join(c for c in table.column_names if c != "day")
        return int(
            scalar(
                cur,
                f"COPY (SELECT {cols} FROM {table.name} WHERE day = DATE '{day.isoformat()}' "
                f"AND _load_seq > {part.lo} AND _load_seq <= {part.hi}) "
                f"TO '{tmp}' (FORMAT parquet, COMPRESSION {self.compression})",
            )
            or 0
        )

    def publish(self) -> int:
        """Publish what changed since the last round and a snapshot; return the files written or removed."""
        with self._lock:
            t0 = time.monotonic()
            if self._cur is None:
                self._cur = self._con.cursor()
            plan = self._plan(self._cur, self.published_seq())
            if plan is None:
                return 0
            self._apply(plan)
            self.done_seq = max(self.done_seq, plan.max_seq)
            self.rounds += 1
            self.last_duration = time.monotonic() - t0
            self.last_published_at = time.monotonic()
            log.debug("published %d files up to load %d in %.2fs", len(plan.writes), plan.high, self.last_duration)
            return len(plan.writes)

    def _plan(self, cur: duckdb.DuckDBPyConnection, low: int) -> _Plan | None:
        """In one read transaction: which parts change, each staged under a hidden name (None: nothing
        to publish). A failure removes what was staged."""
        writes: dict[tuple[Path, Part], Path | None] = {}
        run(cur, "BEGIN TRANSACTION")
        try:
            high = max(last_load_seq(cur, [f.parent for f in FAMILIES]), low)
            dirty = run(
                cur,
                "SELECT family, day, part_seq, max(seq) FROM _callstream_dirty WHERE seq > ? GROUP BY ALL",
                [self.done_seq],
            )
            if high == low and not dirty and current_snapshot(self.root) is not None:
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
                    staged.unlink(missing_ok=True)
            raise
        return _Plan(high, max_seq, writes)

    def _touched(
        self, cur: duckdb.DuckDBPyConnection, new: Part, dirty: list[tuple[Any, ...]]
    ) -> dict[tuple[str, date], set[Part]]:
        """(table, day) -> the parts to write: the new loads' part, and the parts that held replaced rows."""
        touched: dict[tuple[str, date], set[Part]] = {}
        if new.hi > new.lo:
            for table in TABLES:
                for (day,) in run(cur, f"SELECT DISTINCT day FROM {table.name} WHERE _load_seq > ?", [new.lo]):
                    touched.setdefault((table.name, day), set()).add(new)
        for family_name, day, part_seq, _ in dirty:
            for table in _FAMILIES[family_name].tables:
                for p in parts_of(day_dir(self.root, table.name, day)):
                    if p.holds(int(part_seq)):
                        touched.setdefault((table.name, day), set()).add(p)
        return touched

    def _stage(
        self,
        cur: duckdb.DuckDBPyConnection,
        touched: dict[tuple[str, date], set[Part]],
        new: Part,
        writes: dict[tuple[Path, Part], Path | None],
    ) -> None:
        """Copy each touched part's rows to a hidden file (None: the part goes away); a day past
        MAX_PARTS_PER_DAY becomes one merged part."""
        for (name, day), parts in touched.items():
            folder = day_dir(self.root, name, day)
            existing = [p for p in parts_of(folder) if not p.inside(new)]
            every = {*existing, *parts}
            if len(every) > MAX_PARTS_PER_DAY:
                for p in existing:
                    writes[(folder, p)] = None
                parts = {Part(min(p.lo for p in every), max(p.hi for p in every))}
            folder.mkdir(parents=True, exist_ok=True)
            for p in parts:
                tmp = folder / f".{p.name}.tmp"
                writes[(folder, p)] = tmp if self._copy(cur, TABLES_BY_NAME[name], day, p, tmp) else None
                if writes[(folder, p)] is None:
                    tmp.unlink(missing_ok=True)

    def _apply(self, plan: _Plan) -> None:
        """Rename the staged parts into place, remove the gone ones, then mark the loads published."""
        # New and rewritten parts first, then removals: a glob reader may briefly see a row twice
        # during a merge, never miss one; snapshot readers see neither.
        for (folder, p), staged in sorted(plan.writes.items(), key=lambda kv: kv[1] is None):
            if staged is not None:
                os.replace(staged, folder / p.name)
            else:
                (folder / p.name).unlink(missing_ok=True)
        for folder in {folder for folder, _ in plan.writes}:
            self._drop_covered(folder)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        tmp_pub = self.root / f".{PUBLISHED}.tmp"
        tmp_pub.write_bytes(orjson.dumps({"load_seq": plan.high}))
        os.replace(tmp_pub, self.root / PUBLISHED)
        self._snapshot()

    def _snapshot(self) -> None:
        snaps = self.root / SNAPSHOTS
        snaps.mkdir(exist_ok=True)
        gen = f"{time.time_ns():020d}"
        tmp = snaps / f".{gen}.tmp"
        tmp.mkdir()
        files = 0
        for table in TABLES:
            (tmp / table.name).mkdir()
            for f in (self.root / table.name).glob("day=*/part-*.parquet"):
                dest = tmp / table.name / f.parent.name
                dest.mkdir(exist_ok=True)
                os.link(f, dest / f.name)
                files += 1
        (tmp / "manifest.json").write_bytes(
            orjson.dumps({"generation": gen, "files": files, "published_at_ns": time.time_ns()})
        )
        os.rename(tmp, snaps / gen)
        cur_tmp = snaps / f".{CURRENT}.tmp"
        cur_tmp.write_text(gen)
        os.replace(cur_tmp, snaps / CURRENT)
        self._expire(gen)

    def _expire(self, keep: str) -> None:
        """Drop snapshots older than the retention (never the current one): readers had that long."""
        cutoff = time.time() - self.retention
        for p in (self.root / SNAPSHOTS).iterdir():
            if p.name.startswith(".") or p.name in (keep, CURRENT) or not p.is_dir():
                continue
            try:
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                pass
