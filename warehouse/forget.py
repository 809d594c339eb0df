"""`callstream warehouse forget`: erase calls and chats from the warehouse for good (right to be forgotten).

What it does, in order (each step can be repeated after a crash: a later run finishes an earlier one):

1. opens the DuckDB file as its only writer: DuckDB allows one, so while a sink holds the file forget
   refuses with "stop the sink first" (the sink is stopped for the few seconds this takes);
2. finds the calls by id, by chat id, or by phone number in `from_number` / `to_number`, however the
   number is stored (as sent, or hashed with the same key; a masked number keeps only four digits and
   cannot be told apart from others ending the same, so those matches are listed and erased only
   with `include_masked`);
3. in one transaction, deletes their rows from every table of the family, takes them off the load
   ledger's counts (so the sink's start-up check agrees), and records the keys in
   `_callstream_forgotten`, which the sink reads at start and never loads again: a redelivery, a
   replay or a backfill of the same call is skipped;
4. rewrites every Parquet file that holds them, snapshots included (`warehouse.purge`);
5. rewrites the DuckDB file itself (a copy without them replaces it): DuckDB leaves deleted rows'
   bytes in the file, so a DELETE alone would not erase them.

Kafka still holds the raw events until its retention removes them; the README says what an operator
does about that.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import orjson

from warehouse import ledger
from warehouse.db import insert_rows, run, scalar, transaction
from warehouse.errors import WarehouseError
from warehouse.migrations import migrate
from warehouse.personal_data import SQL_SEPARATORS, PersonalData, hash_number, mask_number, normalize_number
from warehouse.purge import PurgeStats, holding, rewrite
from warehouse.schema import CALL_FAMILY, CHAT_FAMILY, FAMILIES, TABLES
from warehouse.settings import SinkSettings
from warehouse.status import status_path

log = logging.getLogger(__name__)

_KEYS = "_forget_keys"  # a temporary table of the connection: (family, key)


class ForgetError(WarehouseError):
    """The erasure cannot be done as asked (the file is in use, a number is not a number, ...)."""


@dataclass(frozen=True, slots=True)
class Selection:
    call_ids: tuple[str, ...] = ()
    chat_ids: tuple[str, ...] = ()
    numbers: tuple[str, ...] = ()
    include_masked: bool = False

    def __bool__(self) -> bool:
        return bool(self.call_ids or self.chat_ids or self.numbers)


@dataclass
class NumberMatch:
    shown: str  # the number masked, for the summary
    calls: set[str] = field(default_factory=set)  # matched as sent or by its hash
    masked: set[str] = field(default_factory=set)  # matched only by the masked form (ambiguous)
    masked_erased: bool = False

    def lines(self, verb: str) -> list[str]:
        out = [f"  number {self.shown}: {verb} {len(self.calls)} calls (number as sent or hashed)"]
        if self.masked:
            what = verb if self.masked_erased else "NOT erased (add --include-masked, or pick them by --call-id)"
            more = " ..." if len(self.masked) > 10 else ""
            out.append(
                f"  number {self.shown}: {len(self.masked)} calls whose masked number ends in the same four digits, "
                f"{what}: {', '.join(sorted(self.masked)[:10])}{more}"
            )
        return out


@dataclass
class Plan:
    """What a selection names in this warehouse."""

    keys: dict[str, set[str]]  # family name -> keys to erase
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows stored now
    numbers: list[NumberMatch] = field(default_factory=list)
    absent: dict[str, set[str]] = field(default_factory=dict)  # ids given but not stored (recorded anyway)
    pending: int = 0  # keys of an earlier, interrupted forget, finished by this one

    def total_keys(self) -> int:
        return sum(len(k) for k in self.keys.values())


@dataclass
class Report:
    plan: Plan
    dry_run: bool
    files: int = 0  # Parquet files that hold the rows (dry run) or held them
    purge: PurgeStats | None = None
    db_bytes: tuple[int, int] | None = None  # the DuckDB file's size before and after its rewrite

    def lines(self) -> list[str]:
        p, verb = self.plan, "would erase" if self.dry_run else "erased"
        calls, chats = p.rows.get(CALL_FAMILY.parent.name, 0), p.rows.get(CHAT_FAMILY.parent.name, 0)
        out = [f"forget: {verb} {calls} calls and {chats} chats"]
        out.append("  rows: " + ", ".join(f"{t.name} {p.rows.get(t.name, 0)}" for t in TABLES))
        for m in p.numbers:
            out += m.lines(verb)
        for family, ids in p.absent.items():
            if ids:
                out.append(f"  not in the warehouse ({family}): {', '.join(sorted(ids))}; recorded, so never loaded")
        if p.pending:
            out.append(f"  finished an earlier, interrupted forget of {p.pending} calls or chats")
        if self.dry_run:
            out.append(f"  {self.files} Parquet files (tree and snapshots) hold them; nothing was changed")
        if self.purge is not None:
            out.append(f"  {self.purge.describe()}")
        if self.db_bytes is not None:
            before, after = self.db_bytes
            out.append(f"  the DuckDB file was rewritten without them ({before:,} -> {after:,} bytes)")
        if not self.dry_run:
            out.append("  the sink will not load these calls or chats again (Kafka still holds their events)")
        return out


def forgotten_keys(con: duckdb.DuckDBPyConnection) -> dict[str, frozenset[str]]:
    """Per family, the keys erased by `forget`: the sink skips them. Warns about an unfinished forget."""
    if not _has_forgotten_table(con):
        return {}
    rows = run(con, "SELECT family, key, files_done FROM _callstream_forgotten")
    if any(not done for *_, done in rows):
        log.warning(
            "an earlier `callstream warehouse forget` did not finish rewriting the files; stop the sink and "
            "run `callstream warehouse forget` again (with no arguments) to finish it"
        )
    out: dict[str, set[str]] = {}
    for family, key, _ in rows:
        out.setdefault(family, set()).add(key)
    return {f: frozenset(k) for f, k in out.items()}


def _open(cfg: SinkSettings, read_only: bool) -> duckdb.DuckDBPyConnection:
    path = Path(cfg.warehouse)
    if not path.is_file():
        raise ForgetError(f"there is no warehouse at {path.resolve()} (CALLSTREAM_WAREHOUSE): nothing to forget")
    try:
        return duckdb.connect(
            str(path),
            read_only=read_only,
            config={"memory_limit": cfg.duckdb_memory_limit, "threads": cfg.duckdb_threads},
        )
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise ForgetError(
                f"the warehouse {path} is open in another process (a running sink?): stop the sink first, run "
                "forget, then start the sink again (it will not load what was erased)"
            ) from exc
        raise ForgetError(f"cannot open the warehouse {path}: {exc}") from exc


def _check_number(number: str) -> str:
    if sum(c.isdigit() for c in number) < 5 or any(c.isalpha() for c in number):
        raise ForgetError(f"--number {mask_number(number)!r} is not a phone number (give it as sent, +14155551234)")
    return number


def _match_number(con: duckdb.DuckDBPyConnection, number: str, personal: PersonalData) -> NumberMatch:
    """Calls with this number as sent (separators aside) or hashed with the key; and, apart, those whose
    masked number ends in its last four digits."""
    exact = [normalize_number(number)]
    if personal.key is not None:
        exact.append(hash_number(number, personal.key))
    norm = "regexp_replace(coalesce({}, ''), '" + SQL_SEPARATORS + "', '', 'g')"
    found = run(
        con,
        f"SELECT call_id FROM calls WHERE list_contains(?::VARCHAR[], {norm.format('from_number')}) "
        f"OR list_contains(?::VARCHAR[], {norm.format('to_number')})",
        [exact, exact],
    )
    masked = mask_number(number)
    loose = run(con, "SELECT call_id FROM calls WHERE from_number = ? OR to_number = ?", [masked, masked])
    calls = {r[0] for r in found}
    return NumberMatch(masked, calls, {r[0] for r in loose} - calls)


def plan(con: duckdb.DuckDBPyConnection, sel: Selection, personal: PersonalData) -> Plan:
    """What `sel` names, and (when the file has the table) what an earlier forget left unfinished."""
    keys: dict[str, set[str]] = {CALL_FAMILY.name: set(sel.call_ids), CHAT_FAMILY.name: set(sel.chat_ids)}
    out = Plan(keys)
    for number in sel.numbers:
        m = _match_number(con, _check_number(number), personal)
        m.masked_erased = sel.include_masked
        out.numbers.append(m)
        keys[CALL_FAMILY.name] |= m.calls | (m.masked if sel.include_masked else set())
    for family, ids in ((CALL_FAMILY, sel.call_ids), (CHAT_FAMILY, sel.chat_ids)):
        if ids:
            key = family.parent.parent_key
            stored = run(con, f"SELECT {key} FROM {family.parent.name} WHERE {key} IN (SELECT unnest(?))", [list(ids)])
            out.absent[family.name] = set(ids) - {r[0] for r in stored}
    if _has_forgotten_table(con):
        for family, key in run(con, "SELECT family, key FROM _callstream_forgotten WHERE NOT files_done"):
            if key not in keys.setdefault(family, set()):
                keys[family].add(key)
                out.pending += 1
    _stage_keys(con, keys)
    for family in FAMILIES:
        for t in family.tables:
            where = f"{t.parent_key} IN (SELECT key FROM {_relation(family.name)})"
            out.rows[t.name] = int(scalar(con, f"SELECT count(*) FROM {t.name} WHERE {where}"))
    return out


def _has_forgotten_table(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(scalar(con, "SELECT count(*) FROM duckdb_tables() WHERE table_name = '_callstream_forgotten'"))


def _stage_keys(con: duckdb.DuckDBPyConnection, keys: dict[str, set[str]]) -> None:
    """The keys as a temporary table of the connection, and a view of them per family."""
    run(con, f"CREATE OR REPLACE TEMP TABLE {_KEYS} (family VARCHAR NOT NULL, key VARCHAR NOT NULL)")
    insert_rows(con, f"INSERT INTO {_KEYS} VALUES", [(f, k) for f, ks in keys.items() for k in sorted(ks)])
    for family in FAMILIES:
        run(
            con,
            f"CREATE OR REPLACE TEMP VIEW {_relation(family.name)} AS "
            f"SELECT key FROM {_KEYS} WHERE family = '{family.name}'",
        )


def _relation(family: str) -> str:
    return f"{_KEYS}_{family}"


def _erase(con: duckdb.DuckDBPyConnection) -> None:
    """One transaction: the rows of every table, their count in the ledger, and the forgotten list."""
    now = datetime.now(UTC).replace(tzinfo=None)
    with transaction(con):
        for family in FAMILIES:
            where = f"{family.parent.parent_key} IN (SELECT key FROM {_relation(family.name)})"
            for t in family.tables:
                ledger.note_replaced(con, t, where)
                run(con, f"DELETE FROM {t.name} WHERE {where}")
        run(con, f"INSERT OR REPLACE INTO _callstream_forgotten SELECT family, key, ?, false FROM {_KEYS}", [now])


def _rewrite_database(con: duckdb.DuckDBPyConnection, path: Path) -> tuple[int, int]:
    """Replace the DuckDB file by a copy of its live rows, marking the forgets done in the copy.

    The copy is opened (and so locked) before it takes the file's name, and the old file is closed
    after: a sink that starts meanwhile is refused, never given the old file.
    """
    before = path.stat().st_size
    run(con, "CHECKPOINT")
    tmp = path.with_name(f".{path.name}.forget.tmp")
    for p in (tmp, Path(f"{tmp}.wal")):
        p.unlink(missing_ok=True)
    db = scalar(con, "SELECT current_database()")
    quoted = str(tmp).replace("'", "''")
    run(con, f"ATTACH '{quoted}' AS _forget_copy")
    try:
        run(con, f'COPY FROM DATABASE "{db}" TO _forget_copy')
        run(con, "UPDATE _forget_copy.main._callstream_forgotten SET files_done = true")
    finally:
        run(con, "DETACH _forget_copy")
    copy = duckdb.connect(str(tmp), read_only=True)
    try:
        os.replace(tmp, path)
        con.close()
    finally:
        copy.close()
    return before, path.stat().st_size


def _update_status(cfg: SinkSettings, con: duckdb.DuckDBPyConnection) -> None:
    """The row counts in `warehouse.status.json` (the sink's other figures stay as it wrote them)."""
    path = status_path(cfg.warehouse)
    try:
        status = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return
    status["tables"] = {t.name: scalar(con, f"SELECT count(*) FROM {t.name}") for t in TABLES}
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(status))
    tmp.replace(path)


def forget(
    cfg: SinkSettings, sel: Selection, dry_run: bool = False, progress: Callable[[int], None] = lambda n: None
) -> Report:
    """Erase what `sel` names (or, with `dry_run`, say what that would be); finish an unfinished forget."""
    personal = PersonalData.from_settings(cfg)
    con = _open(cfg, read_only=dry_run)
    try:
        if not dry_run:
            migrate(con)
        found = plan(con, sel, personal)
        report = Report(found, dry_run)
        root = Path(cfg.parquet_dir)
        if dry_run:
            report.files = sum(
                len(files) for f in FAMILIES for files in holding(con, root, f, _relation(f.name)).values()
            )
            return report
        if not found.total_keys():
            return report
        _erase(con)
        targets = [(f, _relation(f.name)) for f in FAMILIES]
        report.purge = rewrite(con, root, targets, cfg.parquet_compression, progress)
        _update_status(cfg, con)
        report.db_bytes = _rewrite_database(con, Path(cfg.warehouse))
        return report
    finally:
        con.close()
