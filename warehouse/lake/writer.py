"""A batch into the lake: one atomic commit across its tables, carrying the offsets it covers.

The latest delivery of a call wins, as in DuckDB, by copy-on-write: the data files that hold a
redelivered key's old rows (parent and children, found with `FileIndex`) are rewritten without them
in the same commit that adds the new rows. "Latest" is decided by Kafka offset, not by commit order:
a stored row from the same partition at the same or a later offset stays and the batch's rows of that
key are left out. So replaying a batch (after a crash, or by a sink that lost the partition in a
rebalance and committed late) never brings back an older delivery, and two sinks need no other
coordination than the catalog's optimistic concurrency: a commit that lost is planned again on the
new state of the tables and retried, reusing the files it already wrote when they still fit.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io.pyarrow import _dataframe_to_data_files
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table, Transaction
from pyiceberg.table.update import AssertTableUUID

from warehouse.lake.catalog import LakeCatalog, TableChange
from warehouse.lake.errors import LakeError
from warehouse.lake.files import FileIndex, read_file
from warehouse.lake.offsets import COMMIT_ID, WRITER, to_summary
from warehouse.lake.tables import PARTITION_COLUMN, for_write
from warehouse.schema import Family
from warehouse.schema import Table as WTable

log = logging.getLogger(__name__)

SOURCE_COLUMNS = ("kafka_partition", "kafka_offset")


@dataclass
class FamilyRows:
    """One family's rows of a batch (`FamilyBatch.tables()`) and the next offsets of its partitions."""

    family: Family
    tables: dict[str, pa.Table]
    offsets: dict[tuple[str, int], int]


@dataclass
class CommitStats:
    rows: dict[str, int] = field(default_factory=dict)
    replaced: int = 0  # keys whose stored rows this commit replaced
    kept: int = 0  # keys whose stored rows came from the same or a later delivery: left as they were
    attempts: int = 0


@dataclass
class _Plan:
    adds: dict[str, list[DataFile]] = field(default_factory=dict)
    deletes: dict[str, list[DataFile]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    replaced: int = 0
    kept: int = 0


class _Written:
    """Files written for one batch, by what they hold: a retry reuses those that still fit."""

    def __init__(self) -> None:
        self.files: dict[Hashable, list[DataFile]] = {}

    def get(self, key: Hashable, write: Callable[[], list[DataFile]]) -> list[DataFile]:
        if key not in self.files:
            self.files[key] = write()
        return self.files[key]

    def unused(self, used: set[str]) -> list[str]:
        return [f.file_path for fs in self.files.values() for f in fs if f.file_path not in used]


def _days(rows: pa.Table) -> list[int]:
    if rows.num_rows == 0:
        return []
    return [int(d) for d in pc.unique(rows[PARTITION_COLUMN]).cast(pa.int32()).to_pylist()]


def _isin(values: pa.ChunkedArray | pa.Array, keys: pa.Array) -> pa.Array:
    return pc.is_in(values, value_set=keys)


def _any(mask: pa.Array | pa.ChunkedArray) -> bool:
    return bool(pc.any(mask).as_py())


class LakeWriter:
    def __init__(self, catalog: LakeCatalog, attempts: int = 50, key_cache_rows: int = 20_000_000) -> None:
        self.catalog = catalog
        self.attempts = attempts
        self.index = FileIndex(key_cache_rows)
        self.tables: dict[str, Table] = {}
        self.writer_id = f"{socket.gethostname()}-{os.getpid()}"

    # -- planning ------------------------------------------------------------------------------

    def _stored(self, family: Family, rows: pa.Table) -> list[tuple[str, int, int, DataFile]]:
        """(key, partition, offset, file) of every stored parent row with a key of the batch."""
        parent, key = family.parent, family.parent.parent_key
        table = self.tables[parent.name]
        keys = rows[key].combine_chunks()
        out: list[tuple[str, int, int, DataFile]] = []
        for f in self.index.live_files(table, _days(rows)):
            held = self.index.keys(table, f, [key, *SOURCE_COLUMNS])
            mask = _isin(held[key], keys)
            if _any(mask):
                hit = held.filter(mask)
                cols = (hit[c].to_pylist() for c in (key, *SOURCE_COLUMNS))
                out.extend((k, p, o, f) for k, p, o in zip(*cols, strict=True))
        return out

    def _holding(self, table: Table, key: str, keys: pa.Array, days: list[int]) -> list[DataFile]:
        """The live files of a child table (in those days) with rows of any of `keys`."""
        return [
            f for f in self.index.live_files(table, days) if _any(_isin(self.index.keys(table, f, [key])[key], keys))
        ]

    def _plan(self, fr: FamilyRows, written: _Written) -> _Plan:
        family, key = fr.family, fr.family.parent.parent_key
        rows = fr.tables[family.parent.name]
        stored = self._stored(family, rows)
        keep, replace = _decide(rows, key, stored)
        drop_new = pa.array(sorted(keep), pa.string())
        gone = pa.array(sorted(replace), pa.string())
        old_days = sorted({f.partition[0] for k, _, _, f in stored if k in replace})
        plan = _Plan(replaced=len(replace), kept=len(keep))
        for t in family.tables:
            table = self.tables[t.name]
            if t is family.parent:
                hit = list({f.file_path: f for k, _, _, f in stored if k in replace}.values())
            else:
                hit = self._holding(table, key, gone, old_days) if replace else []
            plan.deletes[t.name] = hit
            rewritten = [
                df
                for f in hit
                for df in written.get((f.file_path, tuple(gone.to_pylist())), self._rewriter(t, table, f, gone))
            ]
            new = fr.tables[t.name]
            if keep:
                new = new.filter(pc.invert(_isin(new[key], drop_new)))
            plan.rows[t.name] = new.num_rows
            added = written.get((t.name, tuple(drop_new.to_pylist())), functools.partial(self._write, t, table, new))
            plan.adds[t.name] = rewritten + added
        return plan

    # -- files ---------------------------------------------------------------------------------

    def _cols(self, t: WTable) -> list[str]:
        return [t.parent_key, *SOURCE_COLUMNS] if t.parent_key == t.key[0] and len(t.key) == 1 else [t.parent_key]

    def _write(self, t: WTable, table: Table, rows: pa.Table) -> list[DataFile]:
        if rows.num_rows == 0:
            return []
        data = for_write(t, rows)
        files = list(_dataframe_to_data_files(table.metadata, data, table.io))
        self._remember(t, files, data)
        return files

    def _rewriter(self, t: WTable, table: Table, f: DataFile, gone: pa.Array) -> Callable[[], list[DataFile]]:
        def rewrite() -> list[DataFile]:
            data = read_file(table, f)
            left = data.filter(pc.invert(_isin(data[t.parent_key], gone)))
            if left.num_rows == 0:
                return []
            files = list(_dataframe_to_data_files(table.metadata, left, table.io))
            self._remember(t, files, left)
            return files

        return rewrite

    def _remember(self, t: WTable, files: list[DataFile], data: pa.Table) -> None:
        """The keys of files just written (one file per day: which rows went where is known)."""
        cols = self._cols(t)
        for f in files:
            day = f.partition[0]
            same_day = [g for g in files if g.partition[0] == day]
            if len(same_day) != 1:
                continue
            part = data.filter(pc.equal(data[PARTITION_COLUMN].cast(pa.int32()), day)).select(cols)
            if len(cols) == 1:
                part = pa.table({cols[0]: pc.unique(part[cols[0]].combine_chunks())})
            self.index.remember(f.file_path, part)

    # -- commit --------------------------------------------------------------------------------

    def commit(self, families: list[FamilyRows]) -> CommitStats:
        """Commit the families' rows and offsets atomically, retrying on concurrent commits."""
        names = [t.name for fr in families for t in fr.family.tables]
        written = _Written()
        for attempt in range(1, self.attempts + 1):
            self.tables = self.catalog.load_tables(names, self.tables)
            plans = [self._plan(fr, written) for fr in families]
            changes, txns = self._changes(families, plans)
            try:
                self.tables.update(self.catalog.commit_tables(changes))
            except CommitFailedException as exc:
                for txn in txns:
                    for producer in txn._snapshot_producers:
                        producer._clean_all_uncommitted()
                wait = min(2.0, 0.02 * 2 ** min(attempt, 7)) * random.uniform(0.5, 1.5)
                log.info("lake: commit attempt %d lost to a concurrent commit (%s); retrying", attempt, exc)
                time.sleep(wait)
                continue
            self._tidy(written, plans)
            return _stats(plans, attempt)
        raise LakeError(f"the lake commit lost to concurrent commits {self.attempts} times in a row; giving up")

    def _changes(self, families: list[FamilyRows], plans: list[_Plan]) -> tuple[list[TableChange], list[Transaction]]:
        commit_id = uuid.uuid4().hex
        changes, txns = [], []
        for fr, plan in zip(families, plans, strict=True):
            props = {COMMIT_ID: commit_id, WRITER: self.writer_id, **to_summary(fr.offsets)}
            for t in fr.family.tables:
                txn = _snapshot(self.tables[t.name], plan.adds[t.name], plan.deletes[t.name], props)
                txns.append(txn)
                base = self.tables[t.name]
                reqs = (*txn._requirements, AssertTableUUID(uuid=base.metadata.table_uuid))
                changes.append(TableChange(base, reqs, txn._updates))
        return changes, txns

    def _tidy(self, written: _Written, plans: list[_Plan]) -> None:
        used = {f.file_path for p in plans for fs in p.adds.values() for f in fs}
        io = next(iter(self.tables.values())).io
        for path in written.unused(used):
            io.delete(path)
        self.index.forget(path for p in plans for fs in p.deletes.values() for path in (f.file_path for f in fs))
        self.index.forget(written.unused(used))
        self.index.prune_manifests(self.tables.values())


def _snapshot(table: Table, adds: list[DataFile], deletes: list[DataFile], props: dict[str, str]) -> Transaction:
    """A transaction with one new snapshot: the files added and removed (none: offsets only)."""
    txn = table.transaction()
    snap = txn.update_snapshot(snapshot_properties=props)
    if deletes:
        with snap.overwrite() as ow:
            for f in deletes:
                ow.delete_data_file(f)
            for f in adds:
                ow.append_data_file(f)
    else:
        with snap.fast_append() as fa:
            for f in adds:
                fa.append_data_file(f)
    return txn


def _decide(rows: pa.Table, key: str, stored: list[tuple[str, int, int, DataFile]]) -> tuple[set[str], set[str]]:
    """Keys whose stored rows stay (a same-or-later delivery) and keys whose stored rows go."""
    if not stored:
        return set(), set()
    cols = (rows[c].to_pylist() for c in (key, *SOURCE_COLUMNS))
    new = {k: (p, o) for k, p, o in zip(*cols, strict=True)}
    keep = {k for k, p, o, _ in stored if p == new[k][0] and o >= new[k][1]}
    replace = {k for k, _, _, _ in stored} - keep
    return keep, replace


def _stats(plans: list[_Plan], attempts: int) -> CommitStats:
    stats = CommitStats(attempts=attempts)
    for p in plans:
        for name, n in p.rows.items():
            stats.rows[name] = stats.rows.get(name, 0) + n
        stats.replaced += p.replaced
        stats.kept += p.kept
    return stats
