"""Which data files a table holds now, and which keys each file holds.

Both are cached: manifests and data files never change once written, so a file's keys are read at
most once (and never for the files this process wrote itself). The writer asks, for each batch,
which live files of the batch's days hold any of its keys: the rows a redelivery replaces.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyiceberg.manifest import DataFile, ManifestContent
from pyiceberg.table import Table


class FileIndex:
    def __init__(self, max_rows: int = 20_000_000) -> None:
        self.max_rows = max_rows
        self._manifests: dict[str, list[DataFile]] = {}
        self._keys: OrderedDict[str, pa.Table] = OrderedDict()
        self._rows = 0

    def live_files(self, table: Table, days: Iterable[int] | None = None) -> list[DataFile]:
        """The data files of the table's current snapshot (in the given day partitions only)."""
        snap = table.current_snapshot()
        if snap is None:
            return []
        wanted = None if days is None else set(days)
        out: list[DataFile] = []
        for m in snap.manifests(table.io):
            if m.content != ManifestContent.DATA:
                continue
            files = self._manifests.get(m.manifest_path)
            if files is None:
                files = [e.data_file for e in m.fetch_manifest_entry(table.io, discard_deleted=True)]
                self._manifests[m.manifest_path] = files
            out.extend(f for f in files if wanted is None or f.partition[0] in wanted)
        return out

    def keys(self, table: Table, data_file: DataFile, columns: list[str]) -> pa.Table:
        """The given columns of a data file (the key first), read once."""
        path = data_file.file_path
        got = self._keys.get(path)
        if got is not None:
            self._keys.move_to_end(path)
            return got
        with table.io.new_input(path).open(seekable=True) as f:
            got = pq.read_table(f, columns=columns)
        if len(columns) == 1:  # a child table: which keys, not how many rows each
            got = pa.table({columns[0]: pc.unique(got[columns[0]].combine_chunks())})
        self.remember(path, got)
        return got

    def remember(self, path: str, keys: pa.Table) -> None:
        self._keys[path] = keys
        self._rows += keys.num_rows
        while self._rows > self.max_rows and len(self._keys) > 1:
            _, old = self._keys.popitem(last=False)
            self._rows -= old.num_rows

    def forget(self, paths: Iterable[str]) -> None:
        for p in paths:
            old = self._keys.pop(p, None)
            if old is not None:
                self._rows -= old.num_rows

    def prune_manifests(self, tables: Iterable[Table]) -> None:
        """Drop cached manifests that no current snapshot lists any more."""
        live: set[str] = set()
        for t in tables:
            snap = t.current_snapshot()
            if snap is not None:
                with contextlib.suppress(OSError):
                    live.update(m.manifest_path for m in snap.manifests(t.io))
        for path in set(self._manifests) - live:
            del self._manifests[path]


def read_file(table: Table, data_file: DataFile) -> pa.Table:
    with table.io.new_input(data_file.file_path).open(seekable=True) as f:
        return pq.read_table(f)
