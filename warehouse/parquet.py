"""Publishing the tables as hive-partitioned Parquet, and consistent snapshots of them for readers.

Layout under the Parquet folder:

    <table>/day=YYYY-MM-DD/data.parquet      one file per table and day, always complete
    _snapshots/<generation>/<table>/day=.../data.parquet   hard links: every table at one moment
    _snapshots/CURRENT                       the newest generation's name

A day's file is rewritten from DuckDB whenever rows of that day changed (new calls, or a call
re-delivered, whose old row must not survive in any file). Files are written under a hidden name and
renamed over the old one, so a reader of `<table>/**/*.parquet` never sees a half-written file.
Between two tables' renames a glob reader can see one table newer than the other, so readers that
join tables use a snapshot: a folder of hard links to the files of every table as of one publish
(no copy), named in CURRENT, kept for `snapshot_retention_seconds`. `warehouse.read.connect()` does that.

The publisher runs in its own thread with its own DuckDB cursor: its read transaction sees a committed
state while the loader goes on writing. The days to rewrite are rows of `_callstream_dirty`, written
in the same transaction as the data, so a crash before a publish only means the next run publishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from datetime import date
from pathlib import Path

import duckdb
import orjson

from warehouse.db import run, scalar
from warehouse.errors import WarehouseError
from warehouse.schema import FAMILIES, TABLES

log = logging.getLogger(__name__)

SNAPSHOTS = "_snapshots"
CURRENT = "CURRENT"
DATA_FILE = "data.parquet"
_FAMILIES = {f.name: f for f in FAMILIES}


def day_dir(root: Path, table: str, day: date) -> Path:
    return root / table / f"day={day.isoformat()}"


def current_snapshot(root: Path) -> Path | None:
    """The folder of the newest published snapshot, or None if nothing was published yet."""
    try:
        gen = (root / SNAPSHOTS / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return root / SNAPSHOTS / gen


def snapshot_files(snapshot: Path, table: str) -> list[Path]:
    return sorted((snapshot / table).glob(f"day=*/{DATA_FILE}"))


class ParquetPublisher:
    """Rewrites dirty day partitions on a timer, then publishes a snapshot of all tables."""

    def __init__(self, con: duckdb.DuckDBPyConnection, root: Path, min_interval: float = 2.0,
                 retention_seconds: float = 600.0, compression: str = "zstd") -> None:
        if compression not in ("zstd", "snappy", "gzip", "lz4", "uncompressed"):
            raise WarehouseError(f"parquet compression {compression!r} is not one of zstd, snappy, gzip, lz4, uncompressed")
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

    def _clean_leftovers(self) -> None:
        """Hidden temporary files and folders of a publish that a crash interrupted."""
        for p in self.root.glob("*/day=*/.*.tmp"):
            p.unlink(missing_ok=True)
        snaps = self.root / SNAPSHOTS
        if snaps.exists():
            for p in snaps.glob(".*.tmp"):
                shutil.rmtree(p, ignore_errors=True)

    def needs_full_publish(self) -> bool:
        return current_snapshot(self.root) is None

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
                # Rewriting a day costs more as the day grows; wait at least twice the last round, so
                # publishing takes at most a third of the time and loading keeps going at any rate.
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
        if final and self.error is None:
            self.publish()
        if self._cur is not None:
            self._cur.close()
            self._cur = None

    # -- one round -----------------------------------------------------------------------------

    def publish(self) -> int:
        """Rewrite every dirty day partition and publish a snapshot; return the partitions written."""
        with self._lock:
            t0 = time.monotonic()
            if self._cur is None:
                self._cur = self._con.cursor()
            cur = self._cur
            run(cur, "BEGIN TRANSACTION")
            try:
                dirty = run(cur,
                    "SELECT family, day, max(seq) FROM _callstream_dirty WHERE seq > ? GROUP BY ALL ORDER BY ALL",
                    [self.done_seq],
                )
                if not dirty and not self.needs_full_publish():
                    run(cur, "COMMIT")
                    return 0
                staged: list[tuple[Path, Path | None]] = []  # (final path, tmp path or None to delete)
                for family_name, day, _ in dirty:
                    family = _FAMILIES[family_name]
                    # Children first: a glob reader then sees a call's utterances no later than the call.
                    for table in (*family.children, family.parent):
                        folder = day_dir(self.root, table.name, day)
                        folder.mkdir(parents=True, exist_ok=True)
                        tmp = folder / f".{DATA_FILE}.{os.getpid()}.tmp"
                        cols = ", ".join(c for c in table.column_names if c != "day")
                        rows = int(scalar(cur,
                            f"COPY (SELECT {cols} FROM {table.name} WHERE day = DATE '{day.isoformat()}') "
                            f"TO '{tmp}' (FORMAT parquet, COMPRESSION {self.compression})"
                        ) or 0)
                        if rows == 0:
                            tmp.unlink(missing_ok=True)
                            staged.append((folder / DATA_FILE, None))
                        else:
                            staged.append((folder / DATA_FILE, tmp))
                max_seq = max((int(s) for _, _, s in dirty), default=self.done_seq)
                run(cur, "COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    run(cur, "ROLLBACK")
                raise
            for final, written in staged:
                if written is None:
                    final.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        final.parent.rmdir()
                else:
                    os.replace(written, final)
            self._snapshot()
            self.done_seq = max(self.done_seq, max_seq)
            self.rounds += 1
            self.last_duration = time.monotonic() - t0
            self.last_published_at = time.monotonic()
            log.debug("published %d partitions in %.2fs", len(staged), self.last_duration)
            return len(staged)

    def _snapshot(self) -> None:
        snaps = self.root / SNAPSHOTS
        snaps.mkdir(exist_ok=True)
        gen = f"{time.time_ns():020d}"
        tmp = snaps / f".{gen}.tmp"
        tmp.mkdir()
        files = 0
        for table in TABLES:
            (tmp / table.name).mkdir()
            for f in (self.root / table.name).glob(f"day=*/{DATA_FILE}"):
                dest = tmp / table.name / f.parent.name
                dest.mkdir()
                os.link(f, dest / DATA_FILE)
                files += 1
        (tmp / "manifest.json").write_bytes(orjson.dumps({"generation": gen, "files": files,
                                                           "published_at_ns": time.time_ns()}))
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
