"""Rewriting the Parquet files without given calls or chats: the live parts and every snapshot, for `forget`.

A part is one file with several names: its live place in `<table>/day=.../` and its file in `_files`,
which the snapshots list (`warehouse.parquet_folder`; a folder from before snapshot manifests also
has a hard link in each `_snapshots/<gen>/`). Every file (every inode) that holds a key is copied
without those rows, and each of its names is pointed at the copy by a rename, so a reader never
meets a half-written or missing file: a reader that listed a snapshot's files keeps reading them
(now without the erased rows), and the old file is gone once the last name moved. A copy left with
no rows is removed from the live parts but stays, empty, where snapshots name it, until the folder
retires it. Runs under the folder's lock, while no sink runs (`forget` holds the DuckDB file).
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from warehouse.db import run, scalar
from warehouse.parquet_folder import FILES, SNAPSHOTS, ParquetFolder
from warehouse.schema import Family

_COPY = ".forget-copy.tmp"
_LINK = ".forget-link.tmp"


@dataclass
class PurgeStats:
    files: int = 0  # distinct files that held erased rows (each rewritten once)
    names: int = 0  # names pointed at the rewritten copies (the tree's and the snapshots')
    removed: int = 0  # parts of the tree left empty, removed
    rows: dict[str, int] = field(default_factory=dict)  # rows erased per table
    leftovers: int = 0  # temporary files of an interrupted publish or forget, deleted

    def describe(self) -> str:
        return (
            f"{self.files} Parquet files held them: rewritten under {self.names} names (tree and snapshots), "
            f"{self.removed} parts left empty removed"
        )


def _quote(p: Path | str) -> str:
    return "'" + str(p).replace("'", "''") + "'"


def _names(root: Path, table: str) -> dict[tuple[int, int], list[Path]]:
    """Every name of every part of `table` (tree and snapshots), grouped by the file they name."""
    found: dict[tuple[int, int], list[Path]] = defaultdict(list)
    tree = root.glob(f"{table}/day=*/part-*.parquet")
    stored = root.glob(f"{FILES}/{table}/day=*/part-*.parquet")
    snaps = (p for p in root.glob(f"{SNAPSHOTS}/*/{table}/day=*/part-*.parquet") if not p.parts[-4].startswith("."))
    for p in (*tree, *stored, *snaps):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        found[(st.st_dev, st.st_ino)].append(p)
    return found


def _in_tree(root: Path, p: Path) -> bool:
    """A live part's name (not a stored file or an old snapshot's link)."""
    return p.relative_to(root).parts[0] not in (SNAPSHOTS, FILES)


def remove_leftovers(root: Path) -> int:
    """Temporary files of an interrupted publish or forget: they may hold any row, erased ones too."""
    n = 0
    leftovers = ("*/day=*/.*.tmp", f"{FILES}/*/day=*/.*.tmp", f"{SNAPSHOTS}/*/*/day=*/.*.forget-*.tmp")
    for p in [f for pattern in leftovers for f in root.glob(pattern)]:
        p.unlink(missing_ok=True)
        n += 1
    snaps = root / SNAPSHOTS
    if snaps.is_dir():
        for p in snaps.glob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def holding(
    con: duckdb.DuckDBPyConnection, root: Path, family: Family, keys_table: str
) -> dict[str, dict[tuple[int, int], list[Path]]]:
    """Per table of the family: the files (and all their names) that hold a key of `keys_table`."""
    out: dict[str, dict[tuple[int, int], list[Path]]] = {}
    key = family.parent.parent_key
    for t in family.tables:
        names = _names(root, t.name)
        if not names:
            continue
        first = {group[0]: ino for ino, group in names.items()}
        listing = ", ".join(_quote(p) for p in first)
        hits = run(
            con,
            f"SELECT DISTINCT filename FROM read_parquet([{listing}], filename = true, hive_partitioning = false, "
            f"union_by_name = true) WHERE {key} IN (SELECT key FROM {keys_table})",
        )
        held = {first[Path(f)]: names[first[Path(f)]] for (f,) in hits}
        if held:
            out[t.name] = held
    return out


def rewrite(
    con: duckdb.DuckDBPyConnection,
    root: Path,
    targets: Iterable[tuple[Family, str]],
    compression: str,
    progress: Callable[[int], None] = lambda n: None,
) -> PurgeStats:
    """Rewrite every file (live parts and snapshots) that holds a key of a family's relation (a table
    or view of the connection with a `key` column) without that key's rows."""
    stats = PurgeStats(leftovers=remove_leftovers(root))
    folder = ParquetFolder(root)
    with folder.locked():
        _rewrite_all(con, root, targets, compression, progress, stats)
        folder.rescan()
    return stats


def _rewrite_all(
    con: duckdb.DuckDBPyConnection,
    root: Path,
    targets: Iterable[tuple[Family, str]],
    compression: str,
    progress: Callable[[int], None],
    stats: PurgeStats,
) -> None:
    for family, keys_table in targets:
        key = family.parent.parent_key
        for table, files in holding(con, root, family, keys_table).items():
            for names in files.values():
                before, after = _rewrite_one(con, names, key, keys_table, compression)
                stats.rows[table] = stats.rows.get(table, 0) + before - after
                stats.files += 1
                stats.names += sum(1 for p in names if after or not _in_tree(root, p))
                stats.removed += sum(1 for p in names if not after and _in_tree(root, p))
                if not after:
                    for p in names:
                        if _in_tree(root, p):
                            p.unlink()
                progress(1)


def _rewrite_one(
    con: duckdb.DuckDBPyConnection, names: list[Path], key: str, keys_table: str, compression: str
) -> tuple[int, int]:
    """Copy the file without the keys' rows and point every name at the copy; return rows before and after."""
    src = names[0]
    staged = src.with_name(f".{src.name}{_COPY}")
    source = f"read_parquet({_quote(src)}, hive_partitioning = false)"
    before = int(scalar(con, f"SELECT count(*) FROM {source}"))
    after = int(
        scalar(
            con,
            f"COPY (SELECT * FROM {source} WHERE {key} NOT IN (SELECT key FROM {keys_table})) "
            f"TO {_quote(staged)} (FORMAT parquet, COMPRESSION {compression})",
        )
        or 0
    )
    try:
        for p in names:
            # An emptied part keeps its (empty) file only where readers may hold its name: snapshots.
            link = p.with_name(f".{p.name}{_LINK}")
            link.unlink(missing_ok=True)
            os.link(staged, link)
            os.replace(link, p)
    finally:
        staged.unlink(missing_ok=True)
    return before, after
