"""The Parquet folder: live parts for plain readers, immutable files and snapshots for consistent ones.

    <table>/day=YYYY-MM-DD/part-<from>-<to>.parquet               the live parts: at rest, exactly the tables' rows
    _files/<table>/day=YYYY-MM-DD/part-<from>-<to>.<gen>.parquet  every file published, never changed; each live
                                                                  part is a hard link to one of them (no copy)
    _snapshots/<gen>.json       a snapshot: the files of every table (and their rows) as of change <gen>
    _snapshots/<gen>.retired    the files change <gen> took out of the live parts
    _snapshots/CURRENT          the newest snapshot's generation
    _published.json             every load up to this sequence is in files

A part holds the rows of its table and day that loads from < seq <= to left. A change (new parts,
rewritten parts, merged parts) writes new files into `_files`, swaps the live links (each rename is
atomic), and then names a new snapshot, so a reader of a snapshot sees every table as of one change
and a glob reader of the live parts sees whole files. A file taken out of the live parts stays
`retention` seconds for readers of older snapshots, and is then deleted, and so are the snapshots
no reader can still be on. A change costs the files it writes and a snapshot of one line per live
file; nothing is linked, copied or deleted for the days it does not touch.

Writers (the sink's publisher, `callstream warehouse compact`) hold the folder's lock while they
change it; a writer that finds a snapshot it did not write reloads the folder first.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pyarrow.parquet as pq

from warehouse.schema import KEY_DAYS, TABLES

log = logging.getLogger(__name__)

FILES = "_files"
SNAPSHOTS = "_snapshots"
CURRENT = "CURRENT"
PUBLISHED = "_published.json"
LOCK = ".lock"
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
_STORED = re.compile(r"^part-(\d{12})-(\d{12})\.(\d{20})(\.sorted)?\.parquet$")


@dataclass(frozen=True, order=True, slots=True)
class Part:
    lo: int  # exclusive
    hi: int  # inclusive

    @property
    def name(self) -> str:
        return f"part-{self.lo:012d}-{self.hi:012d}.parquet"

    def stored(self, generation: str, by_key: bool = False) -> str:
        return f"part-{self.lo:012d}-{self.hi:012d}.{generation}{'.sorted' if by_key else ''}.parquet"

    def holds(self, seq: int) -> bool:
        return self.lo < seq <= self.hi

    def inside(self, other: Part) -> bool:
        return self != other and other.lo <= self.lo and self.hi <= other.hi


@dataclass(frozen=True, slots=True)
class Stored:
    """A live part's file in `_files`, and its rows."""

    name: str
    rows: int

    @property
    def by_key(self) -> bool:
        """Its rows are sorted by the table's key (its name says so)."""
        return self.name.endswith(".sorted.parquet")

    @property
    def written_ns(self) -> int:
        return int(self.name.split(".")[1])


@dataclass(frozen=True, slots=True)
class Staged:
    """A file written for a change, not yet in place."""

    path: Path
    rows: int
    by_key: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The files of every table as of one change."""

    name: str
    files: dict[str, list[Path]]


Key = tuple[str, str]  # (table, day as YYYY-MM-DD; "" for a key-days index, which has no days)
# (table, day, part) -> a staged file, or None: the part goes away.
Writes = dict[tuple[str, str, Part], Staged | None]


def _under(table: str, day: str) -> str:
    """A part's folder under its table: `day=YYYY-MM-DD`, or none for a key-days index."""
    return f"{table}/day={day}" if day else table


def parts_of(folder: Path) -> list[Part]:
    """The live parts in a day folder."""
    out = []
    if folder.is_dir():
        for f in folder.iterdir():
            m = _PART.match(f.name)
            if m:
                out.append(Part(int(m.group(1)), int(m.group(2))))
    return sorted(out)


def current_generation(root: Path) -> str | None:
    """The newest snapshot's generation (None before the first publish), without reading it."""
    return _read_current(root)


def _read_current(root: Path) -> str | None:
    try:
        return (root / SNAPSHOTS / CURRENT).read_text().strip() or None
    except FileNotFoundError:
        return None


def _manifest(root: Path, generation: str) -> dict[str, dict[str, dict[str, int]]] | None:
    """table -> day -> stored file name -> rows, as snapshot `generation` names them."""
    try:
        return orjson.loads((root / SNAPSHOTS / f"{generation}.json").read_bytes())["tables"]  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def current_snapshot(root: Path) -> Snapshot | None:
    """The newest snapshot, or None if nothing was published yet."""
    gen = _read_current(root)
    if gen is None:
        return None
    tables = _manifest(root, gen)
    if tables is None:
        old = root / SNAPSHOTS / gen  # a folder of hard links, as sinks before snapshot manifests made them
        if not old.is_dir():
            return None
        return Snapshot(gen, {t.name: sorted((old / t.name).glob("day=*/part-*.parquet")) for t in TABLES})
    return Snapshot(
        gen,
        {
            table: [root / FILES / _under(table, day) / name for day, names in sorted(days.items()) for name in names]
            for table, days in tables.items()
        },
    )


def snapshot_files(snapshot: Snapshot, table: str) -> list[Path]:
    return snapshot.files.get(table, [])


class ParquetFolder:
    """The live parts and the snapshots of one Parquet folder, changed under its lock."""

    def __init__(self, root: Path, retention_seconds: float = 600.0) -> None:
        self.root = root
        self.retention = retention_seconds
        self.parts: dict[Key, dict[Part, Stored]] = {}
        self.generation: str | None = None
        root.mkdir(parents=True, exist_ok=True)

    # -- paths ---------------------------------------------------------------------------------

    def live(self, table: str, day: str) -> Path:
        return self.root / _under(table, day)

    def store(self, table: str, day: str) -> Path:
        return self.root / FILES / _under(table, day)

    @property
    def scratch(self) -> Path:
        """Temporary files of a change under way (emptied whenever the folder is loaded)."""
        return self.root / ".scratch"

    def staging(self, table: str, day: str, part: Part) -> Path:
        """A hidden name in `_files` for a file being written (removed at start if left over)."""
        folder = self.store(table, day)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".{part.name}.tmp"

    def files_of(self, table: str, day: str) -> list[Path]:
        return [self.store(table, day) / s.name for _, s in sorted(self.parts.get((table, day), {}).items())]

    def published_seq(self) -> int:
        try:
            return int(orjson.loads((self.root / PUBLISHED).read_bytes())["load_seq"])
        except FileNotFoundError:
            return 0

    # -- the lock ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock; first reload it when another writer changed it (or at first use)."""
        with open(self.root / LOCK, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                if self.generation is None or _read_current(self.root) != self.generation:
                    self._load()
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def rescan(self) -> None:
        """Load the folder again after its files were rewritten in place (`forget`): a live part
        removed meanwhile leaves the next snapshot, and its file is retired. Hold the lock."""
        self._load()

    # -- loading -------------------------------------------------------------------------------

    def _load(self) -> None:
        """The live parts as the folder holds them, each with its file in `_files` (a live part
        without one, from an older sink or a copied folder, gets one); what an interrupted change
        left behind is cleaned up, and a new snapshot is named when the newest one differs."""
        for pattern in (
            "*/.*.tmp",
            "*/day=*/.*.tmp",
            f"{FILES}/*/.*.tmp",
            f"{FILES}/*/day=*/.*.tmp",
            f"{SNAPSHOTS}/.*.tmp",
        ):
            for leftover in self.root.glob(pattern):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
        gen = _read_current(self.root)
        known = (_manifest(self.root, gen) if gen else None) or {}
        parts: dict[Key, dict[Part, Stored]] = {}
        adopt = f"{time.time_ns():020d}"
        folders = [(t.name, f) for t in TABLES for f in sorted((self.root / t.name).glob("day=*"))]
        folders += [(k.name, self.root / k.name) for k in KEY_DAYS]
        for table, folder in folders:
            day = folder.name.removeprefix("day=") if folder.name.startswith("day=") else ""
            listed = known.get(table, {}).get(day, {})
            by_part = {_part_of(n): Stored(n, r) for n, r in listed.items()}
            for p in _drop_covered(folder):
                parts.setdefault((table, day), {})[p] = self._stored_for(table, day, p, by_part.get(p), adopt)
        self.parts = parts
        self.generation = gen
        listed_now = {k: {s.name: s.rows for s in v.values()} for k, v in parts.items()}
        listed_before = {(t, d): names for t, days in known.items() for d, names in days.items() if names}
        if gen is None or listed_now != listed_before:
            self._snapshot(self._next_generation(), [])
        self._retire_strays()

    def _stored_for(self, table: str, day: str, part: Part, listed: Stored | None, adopt: str) -> Stored:
        live = self.live(table, day) / part.name
        if listed is not None:
            with contextlib.suppress(OSError):
                if os.path.samefile(live, self.store(table, day) / listed.name):
                    return listed
        name = part.stored(adopt)
        dest = self.store(table, day) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)
        os.link(live, dest)
        return Stored(name, pq.ParquetFile(dest).metadata.num_rows)

    def _retire_strays(self) -> None:
        """Files in `_files` that no live part uses and no `.retired` list names: what a change
        interrupted between its renames and its snapshot left. Retired now, deleted after retention."""
        used = {(t, d, s.name) for (t, d), v in self.parts.items() for s in v.values()}
        snaps = self.root / SNAPSHOTS
        pending: set[str] = set()
        for listed in snaps.glob("*.retired"):
            with contextlib.suppress(FileNotFoundError):
                pending.update(orjson.loads(listed.read_bytes()))
        strays = []
        for f in [*(self.root / FILES).glob("*/day=*/part-*.parquet"), *(self.root / FILES).glob("*/part-*.parquet")]:
            if f.parent.name.startswith("day="):
                table, day = f.parent.parent.name, f.parent.name.removeprefix("day=")
            else:
                table, day = f.parent.name, ""
            rel = f"{_under(table, day)}/{f.name}"
            if (table, day, f.name) not in used and rel not in pending:
                strays.append(rel)
        if strays:
            self._write(snaps / f"{self._next_generation()}.retired", orjson.dumps(sorted(strays)))

    # -- changing ------------------------------------------------------------------------------

    def commit(self, writes: Writes, published: int | None = None) -> str:
        """Put staged files in place of live parts (None: remove the part), record `published` as
        the highest load in files, and name a new snapshot; return its generation. Hold the lock."""
        gen = self._next_generation()
        retired: list[str] = []
        # New and rewritten parts first, then removals: a glob reader may briefly see a row twice
        # during a merge, never miss one; snapshot readers see neither.
        for (table, day, part), staged in sorted(writes.items(), key=lambda kv: kv[1] is None):
            key = (table, day)
            old = self.parts.get(key, {}).pop(part, None)
            live = self.live(table, day) / part.name
            if staged is not None:
                stored = Stored(part.stored(gen, staged.by_key), staged.rows)
                os.replace(staged.path, self.store(table, day) / stored.name)
                live.parent.mkdir(parents=True, exist_ok=True)
                link = live.with_name(f".{part.name}.tmp")
                link.unlink(missing_ok=True)
                os.link(self.store(table, day) / stored.name, link)
                os.replace(link, live)
                self.parts.setdefault(key, {})[part] = stored
            else:
                live.unlink(missing_ok=True)
            if old is not None:
                retired.append(f"{_under(table, day)}/{old.name}")
        for key in {(t, d) for t, d, _ in writes}:
            if not self.parts.get(key):
                self.parts.pop(key, None)
                with contextlib.suppress(OSError):
                    self.live(*key).rmdir()  # only when empty
        if published is not None:
            self._write(self.root / PUBLISHED, orjson.dumps({"load_seq": published}))
        self._snapshot(gen, retired)
        self.expire()
        return gen

    def _next_generation(self) -> str:
        now = time.time_ns()
        if self.generation is not None:
            now = max(now, int(self.generation) + 1)
        return f"{now:020d}"

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _snapshot(self, gen: str, retired: list[str]) -> None:
        """The manifest, then CURRENT, then the retired list (a crash before it leaves strays,
        which the next load retires)."""
        snaps = self.root / SNAPSHOTS
        tables: dict[str, dict[str, dict[str, int]]] = {}
        for (table, day), parts in sorted(self.parts.items()):
            tables.setdefault(table, {})[day] = {s.name: s.rows for _, s in sorted(parts.items())}
        manifest = {"generation": gen, "published_at_ns": time.time_ns(), "tables": tables}
        self._write(snaps / f"{gen}.json", orjson.dumps(manifest))
        self._write(snaps / CURRENT, gen.encode())
        self.generation = gen
        if retired:
            self._write(snaps / f"{gen}.retired", orjson.dumps(retired))

    def expire(self, retention_seconds: float | None = None) -> int:
        """Delete the files retired more than the retention ago, and the snapshots that were
        replaced more than the retention ago (never the current one); return the files deleted."""
        keep_ns = (self.retention if retention_seconds is None else retention_seconds) * 1e9
        cutoff = time.time_ns() - keep_ns
        snaps = self.root / SNAPSHOTS
        names = sorted(os.listdir(snaps)) if snaps.is_dir() else []
        deleted = 0
        for n in names:
            if n.endswith(".retired") and not n.startswith(".") and int(n.split(".")[0]) <= cutoff:
                deleted += self._delete_retired(snaps / n)
        gens = [n.removesuffix(".json") for n in names if n.endswith(".json") and n[:1].isdigit()]
        for gen, newer in itertools.pairwise(gens):
            if int(newer) <= cutoff and gen != self.generation:
                (snaps / f"{gen}.json").unlink(missing_ok=True)
        for n in names:  # snapshot folders of hard links, from sinks before snapshot manifests
            if n.isdigit() and n != self.generation and int(n) <= cutoff and (snaps / n).is_dir():
                shutil.rmtree(snaps / n, ignore_errors=True)
        return deleted

    def _delete_retired(self, listed: Path) -> int:
        deleted = 0
        try:
            rels = orjson.loads(listed.read_bytes())
        except FileNotFoundError:
            return 0
        for rel in rels:
            f = self.root / FILES / rel
            if f.exists():
                f.unlink(missing_ok=True)
                deleted += 1
            with contextlib.suppress(OSError):
                f.parent.rmdir()  # only when empty
        listed.unlink(missing_ok=True)
        return deleted


def _part_of(stored_name: str) -> Part:
    m = _STORED.match(stored_name)
    if m is None:
        raise ValueError(f"not a stored part name: {stored_name}")
    return Part(int(m.group(1)), int(m.group(2)))


def _drop_covered(folder: Path) -> list[Part]:
    """Remove the live parts whose load range lies inside another's (what a crash between a merge
    and its removals leaves); return the parts that stay."""
    parts = parts_of(folder)
    keep = []
    for p in parts:
        if any(p.inside(o) for o in parts):
            (folder / p.name).unlink(missing_ok=True)
        else:
            keep.append(p)
    return keep
