"""`callstream lake maintain`: compact small files, checkpoint the offsets, expire old snapshots and
delete the files no snapshot needs any more, while sinks write and readers read.

Readers stay safe: a snapshot is expired only once it has not been the current one for
`retain_seconds`, and a file is deleted only if no remaining snapshot lists it and it is older than
that too (a sink's files that are not committed yet are younger). Compaction changes files, not rows;
a compaction that loses to a sink's commit is planned again on the new state.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyarrow as pa
from pyarrow import fs as pafs
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io.pyarrow import PyArrowFileIO, _dataframe_to_data_files
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table
from pyiceberg.table.update import AssertTableUUID, RemoveSnapshotsUpdate

from warehouse.lake import offsets
from warehouse.lake.catalog import LakeCatalog, TableChange
from warehouse.lake.errors import LakeError
from warehouse.lake.files import FileIndex, read_file
from warehouse.lake.writer import _snapshot
from warehouse.schema import FAMILIES, TABLES

log = logging.getLogger(__name__)

ATTEMPTS = 20
_OURS = (".parquet", ".avro", ".metadata.json")


@dataclass
class MaintainStats:
    compacted_files: int = 0
    written_files: int = 0
    expired_snapshots: int = 0
    deleted_files: int = 0
    tables: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"compacted {self.compacted_files} files into {self.written_files}, expired {self.expired_snapshots} "
            f"snapshots, deleted {self.deleted_files} unreferenced files"
        )


def _commit_one(catalog: LakeCatalog, base: Table, change: TableChange) -> Table:
    return catalog.commit_tables([change])[base.name()[-1]]


def _groups(files: list[DataFile], target_bytes: int) -> list[list[DataFile]]:
    """Small files of one partition in groups of about `target_bytes` (groups of one are left alone)."""
    small = sorted((f for f in files if f.file_size_in_bytes < target_bytes // 2), key=lambda f: f.file_path)
    groups: list[list[DataFile]] = [[]]
    size = 0
    for f in small:
        if size >= target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += f.file_size_in_bytes
    return [g for g in groups if len(g) > 1]


def compact_table(catalog: LakeCatalog, name: str, target_bytes: int, stats: MaintainStats) -> None:
    """Rewrite each partition's small files into files of about `target_bytes`."""
    index = FileIndex()
    for _ in range(ATTEMPTS):
        table = catalog.load_tables([name])[name]
        by_day: dict[object, list[DataFile]] = {}
        for f in index.live_files(table):
            by_day.setdefault(f.partition[0], []).append(f)
        groups = [g for files in by_day.values() for g in _groups(files, target_bytes)]
        if not groups:
            return
        inputs = [f for g in groups for f in g]
        outputs = [
            out
            for g in groups
            for out in _dataframe_to_data_files(
                table.metadata, pa.concat_tables([read_file(table, f) for f in g]), table.io
            )
        ]
        txn = _snapshot(table, outputs, inputs, {"callstream.maintenance": "compact"})
        reqs = (*txn._requirements, AssertTableUUID(uuid=table.metadata.table_uuid))
        try:
            _commit_one(catalog, table, TableChange(table, reqs, txn._updates))
        except CommitFailedException:
            for f in outputs:
                table.io.delete(f.file_path)
            continue
        stats.compacted_files += len(inputs)
        stats.written_files += len(outputs)
        return
    raise LakeError(f"compacting {name} lost to concurrent commits {ATTEMPTS} times; try again later")


def checkpoint(catalog: LakeCatalog) -> None:
    """A snapshot on each family's tables that carries every partition's offset, so that expiring the
    snapshots before it loses none (sinks' commits carry only their own partitions')."""
    for family in FAMILIES:
        names = [t.name for t in family.tables]
        for _ in range(ATTEMPTS):
            tables = catalog.load_tables(names)
            carried = offsets.stored(tables[family.parent.name].metadata)
            props = {
                offsets.COMMIT_ID: uuid.uuid4().hex,
                "callstream.maintenance": "checkpoint",
                **offsets.to_summary(carried),
            }
            changes = []
            for t in tables.values():
                txn = _snapshot(t, [], [], props)
                changes.append(
                    TableChange(t, (*txn._requirements, AssertTableUUID(uuid=t.metadata.table_uuid)), txn._updates)
                )
            try:
                catalog.commit_tables(changes)
                break
            except CommitFailedException:
                continue
        else:
            raise LakeError(f"checkpointing {family.name} lost to concurrent commits {ATTEMPTS} times")


def expire_table(catalog: LakeCatalog, name: str, retain_seconds: float, stats: MaintainStats) -> Table:
    """Remove the snapshots that stopped being current more than `retain_seconds` ago."""
    for _ in range(ATTEMPTS):
        table = catalog.load_tables([name])[name]
        cutoff = int((time.time() - retain_seconds) * 1000)
        log_entries = table.metadata.snapshot_log
        current = table.metadata.current_snapshot_id
        superseded = {a.snapshot_id: b.timestamp_ms for a, b in itertools.pairwise(log_entries)}
        old = [
            s.snapshot_id
            for s in table.metadata.snapshots
            if s.snapshot_id != current and superseded.get(s.snapshot_id, s.timestamp_ms) < cutoff
        ]
        if not old:
            return table
        change = TableChange(
            table,
            (AssertTableUUID(uuid=table.metadata.table_uuid),),
            (RemoveSnapshotsUpdate(snapshot_ids=old),),  # type: ignore[call-arg]
        )
        try:
            table = _commit_one(catalog, table, change)
        except CommitFailedException:
            continue
        stats.expired_snapshots += len(old)
        return table
    raise LakeError(f"expiring snapshots of {name} lost to concurrent commits {ATTEMPTS} times")


def _referenced(table: Table) -> set[str]:
    """Every file the table's metadata reaches: metadata, manifest lists, manifests, data files."""
    paths = {table.metadata_location, *(e.metadata_file for e in table.metadata.metadata_log)}
    seen: set[str] = set()
    for snap in table.metadata.snapshots:
        paths.add(snap.manifest_list)
        for m in snap.manifests(table.io):
            if m.manifest_path in seen:
                continue
            seen.add(m.manifest_path)
            paths.update(e.data_file.file_path for e in m.fetch_manifest_entry(table.io, discard_deleted=True))
    return {_bare(p) for p in paths | seen}


def _bare(location: str) -> str:
    """A location as the filesystem lists it: bucket/key for S3, the path for local files."""
    url = urlparse(location)
    return f"{url.netloc}{url.path}" if url.scheme in ("s3", "s3a") else url.path


def delete_unreferenced(table: Table, retain_seconds: float, stats: MaintainStats) -> None:
    """Delete the table's files that no remaining snapshot needs and that are older than `retain_seconds`."""
    io = table.io
    if not isinstance(io, PyArrowFileIO):
        return
    url = urlparse(table.location())
    fs = io.fs_by_scheme(url.scheme or "file", url.netloc)
    keep = _referenced(table)
    cutoff = time.time() - retain_seconds
    try:
        listed = fs.get_file_info(pafs.FileSelector(_bare(table.location()), recursive=True))
    except FileNotFoundError:
        return
    for info in listed:
        # Some S3 servers list folders as objects too: only the lake's own kinds of files go.
        if info.type != pafs.FileType.File or not info.path.endswith(_OURS) or info.path in keep:
            continue
        if info.mtime is not None and info.mtime.timestamp() < cutoff:
            try:
                fs.delete_file(info.path)
            except OSError as exc:
                log.warning("lake maintain: could not delete %s: %s", info.path, exc)
                continue
            stats.deleted_files += 1


def maintain(
    catalog: LakeCatalog, retain_seconds: float = 3600.0, target_bytes: int = 32 * 1024 * 1024
) -> MaintainStats:
    """Compact, checkpoint, expire and clean up every table of the lake."""
    stats = MaintainStats()
    for t in TABLES:
        compact_table(catalog, t.name, target_bytes, stats)
    checkpoint(catalog)
    for t in TABLES:
        table = expire_table(catalog, t.name, retain_seconds, stats)
        delete_unreferenced(table, retain_seconds, stats)
        live = FileIndex().live_files(table)
        stats.tables[t.name] = {"files": len(live), "snapshots": len(table.metadata.snapshots)}
    return stats
