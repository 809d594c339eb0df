"""`python -m bench.warehouse_history`: the sink and the readers with months of calls already stored.

For each size of history (0, 1 million and 10 million calls by default):
  1. pre-fill a warehouse fast: calls and their utterances generated in DuckDB SQL (50,000 calls a
     day on the days before today, --utterances per call, short texts, no tool calls), then
     published as Parquet once, one part per table and day sorted by key (what compaction leaves);
  2. time `callstream sink --until-caught-up` loading the same 100,000 new simulated calls from a
     pre-filled topic into it (start, load, final publish), with CPU seconds and peak RSS;
  3. in-process, on the same file with the sink's memory limit: the replace check for a batch of
     2,000 new keys, as the sink does it (a scan of the key hashes) and as it did before (a
     semi-join on call_id);
  4. at the largest size, through `warehouse.read.connect()`: `daily_agent_stats` over 30 days and
     one call's utterances by call_id, in a fresh connection and again in the same one.
With --art, also the memory of the primary-key index (DuckDB's ART) the schema had before, at the
largest size. Writes the "Warehouse: a year of traffic" section of bench/RESULTS.md. Needs about
5 GB of disk at 10 million calls; deletes everything at the end.

    python -m bench.warehouse_history                       # 0, 1M, 10M existing calls
    python -m bench.warehouse_history --sizes 0 100000 --new-calls 20000   # a quick one
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa

from bench.report import bench_kafka, bench_workdir, machine, write_section
from bench.warehouse import Pool, bench_sink, produce
from kernel.topics import ensure_topics
from warehouse.db import run, scalar
from warehouse.load import stored_versions
from warehouse.migrations import migrate
from warehouse.parquet_folder import ParquetFolder, Part, Staged, Writes
from warehouse.read import connect
from warehouse.schema import CALL_FAMILY, CALL_UTTERANCES, CALLS, key_hash
from warehouse.sorted_parts import ROW_GROUP_ROWS

PER_DAY = 50_000
LOAD = 2_000  # calls per pre-filled load, the sink's batch size
MEMORY_LIMIT = "128MB"  # the sink's default


@dataclass
class Row:
    existing: int
    seconds: float = 0.0
    cpu: float = 0.0
    rss_mb: float = 0.0
    check_ms: float = 0.0
    old_check_ms: float = 0.0
    prefill_s: float = 0.0
    disk_gb: float = 0.0
    reads: dict[str, float] = field(default_factory=dict)


def _calls_sql(lo: int, hi: int, first_day: date) -> str:
    """Calls lo..hi-1: PER_DAY a day from `first_day`, loads of LOAD calls, realistic columns, short texts."""
    start = (
        f"(TIMESTAMP '{first_day.isoformat()}' + to_milliseconds(((i // {PER_DAY}) * 86400000 "
        f"+ (i % {PER_DAY}) * (86400000 // {PER_DAY}))::BIGINT))"
    )
    return f"""
        SELECT 'call_' || md5('prefill' || i::VARCHAR) AS call_id, 'agent_' || (i % 20) AS agent_id,
          1 AS agent_version, 'Agent ' || (i % 20) AS agent_name, 'phone_call' AS call_type,
          CASE WHEN i % 3 = 0 THEN 'outbound' ELSE 'inbound' END AS direction,
          '+1555' || lpad((i % 10000000)::VARCHAR, 7, '0') AS from_number, '+15550100000' AS to_number,
          CASE WHEN i % 10 = 0 THEN 'not_connected' ELSE 'ended' END AS call_status,
          ['user_hangup', 'agent_hangup', 'call_transfer', 'voicemail_reached'][1 + i % 4] AS disconnection_reason,
          {start} AS start_timestamp, {start} + to_milliseconds(30000 + i % 300000) AS end_timestamp,
          30000 + i % 300000 AS duration_ms, i % 3 <> 0 AS call_successful,
          ['Positive', 'Neutral', 'Negative', 'Unknown'][1 + i % 4] AS user_sentiment, i % 17 = 0 AS in_voicemail,
          'The caller asked about an appointment.' AS call_summary, (i % 100) / 100.0 AS combined_cost,
          800.0 + i % 400 AS e2e_latency_p50, 1200.0 + i % 400 AS e2e_latency_p90, 1600.0 + i % 400 AS e2e_latency_p99,
          'Agent: Hello, how can I help?' || chr(10) || 'User: I would like an appointment.' AS transcript,
          '{{"campaign": "spring"}}' AS metadata, 4 AS utterance_count, 0 AS tool_call_count,
          CAST({start} AS DATE) AS day, {start} AS event_received_at, 0 AS kafka_partition, i AS kafka_offset,
          {start} AS loaded_at, 1 + i // {LOAD} AS _load_seq
        FROM range({lo}, {hi}) t(i)"""


def prefill(path: Path, parquet: Path, n: int, utterances: int, say: Callable[[str], None]) -> float:
    """A warehouse file with n calls (and their utterances) and its Parquet folder; returns seconds."""
    t0 = time.monotonic()
    con = duckdb.connect(str(path), config={"memory_limit": "2GB", "preserve_insertion_order": True})
    migrate(con)
    first_day = datetime.now(UTC).date() - timedelta(days=-(-n // PER_DAY) + 1)
    turns = f"range({utterances}) u(turn)"
    for lo in range(0, n, 1_000_000):
        hi = min(n, lo + 1_000_000)
        run(
            con,
            f"INSERT INTO calls BY NAME SELECT *, {key_hash('call_id')} AS _key_hash "
            f"FROM ({_calls_sql(lo, hi, first_day)})",
        )
        run(
            con,
            f"""INSERT INTO call_utterances BY NAME
            SELECT c.call_id, turn, CASE WHEN turn % 2 = 0 THEN 'agent' ELSE 'user' END AS role,
              'Utterance ' || turn || ' of a pre-filled call, about an appointment.' AS content,
              turn * 5.0 AS start_s, turn * 5.0 + 4 AS end_s, c.day, c._load_seq
            FROM (SELECT call_id, day, _load_seq FROM calls
                  WHERE _load_seq > {lo // LOAD} AND _load_seq <= {-(-hi // LOAD)}) c, {turns}""",
        )
        say(f"  pre-filled {hi:,} calls ({time.monotonic() - t0:.0f}s)")
    last = int(scalar(con, "SELECT coalesce(max(_load_seq), 0) FROM calls"))
    run(con, "UPDATE _callstream_ledger_base SET seq = ?", [last])
    run(con, "CHECKPOINT")
    _publish_once(con, parquet, last)
    con.close()
    return time.monotonic() - t0


def _publish_once(con: duckdb.DuckDBPyConnection, parquet: Path, last: int) -> None:
    """One part per table and day, sorted by key, and the call_days index, as one snapshot."""
    folder = ParquetFolder(parquet)
    writes: Writes = {}
    with folder.locked():
        days = run(con, "SELECT day, min(_load_seq) - 1, max(_load_seq) FROM calls GROUP BY day ORDER BY day")
        for t in (CALLS, CALL_UTTERANCES):
            cols = ", ".join(c for c in t.column_names if c != "day")
            for day, lo, hi in days:
                part = Part(int(lo), int(hi))
                tmp = folder.staging(t.name, day.isoformat(), part)
                rows = scalar(
                    con,
                    f"COPY (SELECT {cols} FROM {t.name} WHERE day = DATE '{day.isoformat()}' "
                    f"ORDER BY {', '.join(t.key)}) "
                    f"TO '{tmp}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP_ROWS})",
                )
                if rows:
                    writes[(t.name, day.isoformat(), part)] = Staged(tmp, int(rows), by_key=True)
        if days:
            part = Part(0, last)
            tmp = folder.staging("call_days", "", part)
            rows = scalar(
                con,
                f"COPY (SELECT call_id, day FROM calls ORDER BY call_id) TO '{tmp}' "
                f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP_ROWS})",
            )
            writes[("call_days", "", part)] = Staged(tmp, int(rows), by_key=True)
        folder.commit(writes, published=last)


def replace_checks(path: Path, reps: int = 5) -> tuple[float, float]:
    """Best of `reps`, ms: the sink's replace check for 2,000 new keys, and the semi-join it replaced."""
    con = duckdb.connect(str(path), config={"memory_limit": MEMORY_LIMIT, "threads": 2})
    best_new = best_old = float("inf")
    for _ in range(reps):
        keys = pa.table({"call_id": [f"call_{uuid.uuid4().hex}" for _ in range(2000)]})
        con.register("_batch_keys", keys)
        t0 = time.perf_counter()
        assert stored_versions(con, CALL_FAMILY) == []
        best_new = min(best_new, time.perf_counter() - t0)
        t0 = time.perf_counter()
        run(con, "SELECT p.day, p._load_seq FROM calls p SEMI JOIN _batch_keys b ON p.call_id = b.call_id")
        best_old = min(best_old, time.perf_counter() - t0)
        con.unregister("_batch_keys")
    con.close()
    return best_new * 1000, best_old * 1000


def reads(parquet: Path, path: Path) -> dict[str, float]:
    """ms: daily_agent_stats over the last 30 days, and one stored call's utterances, cold and warm."""
    with duckdb.connect(str(path), read_only=True) as con:
        (call_id,) = con.execute("SELECT call_id FROM calls USING SAMPLE 1 ROWS").fetchone() or ("",)
        newest = con.execute("SELECT max(day) FROM calls").fetchone()[0]  # type: ignore[index]
    since = newest - timedelta(days=29)
    queries = {
        "`daily_agent_stats` over 30 days": (f"SELECT * FROM daily_agent_stats WHERE day >= DATE '{since}'", []),
        "one call's utterances: `call_utterances_of(id)`": (
            "SELECT * FROM call_utterances_of(?) ORDER BY turn",
            [call_id],
        ),
        "one call: `calls_of(id)`": ("SELECT * FROM calls_of(?)", [call_id]),
        "one call's utterances: `WHERE call_id = ?`": (
            "SELECT * FROM call_utterances WHERE call_id = ? ORDER BY turn",
            [call_id],
        ),
    }
    out: dict[str, float] = {}
    for name, (sql, params) in queries.items():
        reader = connect(parquet)
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            rows = reader.execute(sql, params).fetchall()
            out[f"{name} ({label})"] = (time.perf_counter() - t0) * 1000
            assert rows, name
        reader.close()
    return out


def art_memory(path: Path) -> str:
    """What the primary-key index of the old schema costs at this size: built on a copy of the keys."""
    probe = path.with_name("art.duckdb")
    con = duckdb.connect(str(probe), config={"memory_limit": "8GB"})
    run(con, f"ATTACH '{path}' AS w (READ_ONLY)")
    run(con, "CREATE TABLE k (call_id VARCHAR PRIMARY KEY)")
    run(con, "INSERT INTO k SELECT call_id FROM w.calls")
    run(con, "CHECKPOINT")
    con.close()
    n_keys = 2000
    keys = [f"call_{uuid.uuid4().hex}" for _ in range(n_keys)]
    con = duckdb.connect(str(probe), config={"memory_limit": MEMORY_LIMIT})
    try:
        run(con, "INSERT INTO k SELECT * FROM (SELECT unnest(?)) ", [keys])
        at_limit = "fits"
    except duckdb.OutOfMemoryException:
        at_limit = "runs out of memory"
    con.close()
    con = duckdb.connect(str(probe), config={"memory_limit": "8GB"})
    for _ in range(20):
        batch = [f"call_{uuid.uuid4().hex}" for _ in range(n_keys)]
        run(con, "INSERT INTO k SELECT * FROM (SELECT unnest(?))", [batch])
    art_mb = scalar(con, "SELECT memory_usage_bytes / 1e6 FROM duckdb_memory() WHERE tag = 'ART_INDEX'")
    con.close()
    probe.unlink(missing_ok=True)
    Path(f"{probe}.wal").unlink(missing_ok=True)
    return (
        f"inserting a batch of {n_keys:,} new keys into the index of the old schema's primary key on its "
        f"{MEMORY_LIMIT} memory limit {at_limit}; without a limit, after 20 batches the index holds "
        f"{art_mb:,.0f} MB in memory"
    )


def say(message: str) -> None:
    print(message, file=sys.stderr)


def _disk_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9


def measure(size: int, args: argparse.Namespace, bootstrap: str, prefix: str, work: Path) -> tuple[Row, str]:
    here = work / f"history-{size}"
    here.mkdir()
    row = Row(size)
    say(f"{size:,} existing calls: pre-filling ...")
    row.prefill_s = prefill(here / "warehouse.duckdb", here / "parquet", size, args.utterances, say)
    row.check_ms, row.old_check_ms = replace_checks(here / "warehouse.duckdb")
    say(f"  replace check {row.check_ms:.1f} ms (semi-join on call_id {row.old_check_ms:.1f} ms); loading ...")
    runs = []
    for i in range(args.repeat):
        # Each run on a copy of the pre-filled warehouse; Parquet files never change, so links do.
        run_dir = work / f"history-{size}-run{i}"
        run_dir.mkdir()
        shutil.copy2(here / "warehouse.duckdb", run_dir / "warehouse.duckdb")
        shutil.copytree(here / "parquet", run_dir / "parquet", copy_function=os.link)
        seconds, cpu, rss, status = bench_sink(bootstrap, prefix, run_dir)
        if status["tables"]["calls"] != size + args.new_calls:
            raise SystemExit(f"the sink holds {status['tables']['calls']} calls, not {size + args.new_calls}")
        runs.append((seconds, cpu, rss))
        if i < args.repeat - 1:
            shutil.rmtree(run_dir)
    row.seconds, row.cpu, row.rss_mb = min(runs)  # the fastest run: the least disturbed by the neighbours
    shutil.rmtree(here)
    here = run_dir
    row.disk_gb = _disk_gb(here)
    art = ""
    if size == max(args.sizes):
        row.reads = reads(here / "parquet", here / "warehouse.duckdb")
        if args.art:
            say("  the old schema's index ...")
            art = art_memory(here / "warehouse.duckdb")
    shutil.rmtree(here, ignore_errors=True)
    return row, art


def report(rows: list[Row], args: argparse.Namespace, pool: Pool, loads: tuple[float, float], art: str) -> str:
    empty = rows[0]
    lines = [
        "## Warehouse: a year of traffic",
        "",
        f"`python -m bench.warehouse_history` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}, DuckDB "
        f"{duckdb.__version__}. Load average {loads[0]:.1f} at the start, {loads[1]:.1f} at the end: other work "
        "shared the two cores, so wall-clock figures are a floor; CPU seconds depend less on the neighbours.",
        "",
        f"Each run loads the same {args.new_calls:,} new simulated calls ({pool.mean_bytes / 1024:.1f} KB on "
        "average, from a 3-partition topic) with `callstream sink --until-caught-up` into a warehouse that already "
        f"holds the given number of calls. The existing calls were generated in DuckDB SQL ({PER_DAY:,} a day on "
        f"the days before today, {args.utterances} utterances each, short texts, no tool calls), loaded in loads of "
        f"{LOAD:,} and published as Parquet once, one part per table and day sorted by key, as compaction leaves it. "
        f"Each size is loaded {args.repeat} times, on copies of the same pre-filled warehouse; the table shows "
        "the fastest run.",
        "",
        "| existing calls | calls/s | seconds | CPU seconds | peak RSS | vs empty | replace check per batch | "
        "before (semi-join on call_id) | disk | pre-fill |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        rate = args.new_calls / r.seconds
        lines.append(
            f"| {r.existing:,} | {rate:,.0f} | {r.seconds:.1f} | {r.cpu:.1f} | {r.rss_mb:.0f} MB | "
            f"{rate / (args.new_calls / empty.seconds):.0%} calls/s, {empty.cpu / r.cpu:.0%} calls per CPU s | "
            f"{r.check_ms:.1f} ms | {r.old_check_ms:.1f} ms | {r.disk_gb:.1f} GB | {r.prefill_s:.0f} s |"
        )
    big = rows[-1]
    lines += [
        "",
        f"Reads at {big.existing:,} existing calls through `warehouse.read.connect()` (a fresh connection "
        "for each query: cold is its first run, warm the second):",
        "",
        "| query | ms |",
        "| --- | ---: |",
    ]
    lines += [f"| {q} | {ms:,.1f} |" for q, ms in big.reads.items()]
    lines += ["", *_explained(rows, art)]
    lines += [
        "",
        "Goals: the sink's calls/s at 10 million existing calls within 20% of the empty warehouse's; "
        "`daily_agent_stats` over 30 days under 1 s; one call's utterances under 50 ms. Re-run: "
        "`python -m bench.warehouse_history` (`--sizes 0 100000 --new-calls 20000` for a quick one).",
    ]
    return "\n".join(lines)


def _explained(rows: list[Row], art: str) -> list[str]:
    big = rows[-1]
    per_call_ns = (big.check_ms - rows[0].check_ms) * 1e6 / max(big.existing, 1)
    lines = [
        "What grows with the history, and what does not. The replace check scans `_key_hash` (8 bytes a "
        "stored call) for the batch's keys and then compares the keys of the few rows it found; the semi-join "
        "on `call_id` it replaced compared every stored key as a string, for every batch. The hash scan is the "
        f"one per-batch cost left that grows with the history, by about {per_call_ns:.1f} ns of wall time per "
        "stored call and batch here (spread over DuckDB's two threads). The child rows of a replaced call are "
        "deleted through the load that wrote it, so zone maps skip the rest of `call_utterances`; the counts "
        "before and after each COMMIT, the load ledger (trimmed at every periodic CHECKPOINT), the status "
        "file's counts (kept per load) and the Parquet publisher's queries name only the batch's loads.",
    ]
    if art:
        lines += [
            "",
            f"Why not DuckDB's index: a primary key (ART) answers a batch's keys in constant time, but DuckDB "
            f"holds the whole index in memory once it is used; at {big.existing:,} calls {art}. Schema version 3 "
            "drops the old schema's primary keys for that reason.",
        ]
    lines += [
        "",
        "Reads: `daily_agent_stats` over 30 days opens those days' files only (the `day` partitions). "
        "`call_utterances_of(id)` (and `calls_of`, ...) looks the call's day up in `call_days` and opens that "
        f"day's files only; a plain `WHERE call_id = ?` opens one file per day ({big.existing // PER_DAY + 1} "
        "days here), which is what it costs.",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 1_000_000, 10_000_000], help="existing calls")
    ap.add_argument("--new-calls", type=int, default=100_000, help="calls the sink loads in each run")
    ap.add_argument("--utterances", type=int, default=4, help="utterances per pre-filled call")
    ap.add_argument("--art", action="store_true", help="also measure the old schema's primary-key index")
    ap.add_argument("--repeat", type=int, default=2, help="sink runs per size, on copies; the fastest is reported")
    ap.add_argument("--bootstrap", default=os.environ.get("CALLSTREAM_KAFKA_BOOTSTRAP"), help="an existing broker")
    ap.add_argument("--no-write", action="store_true", help="print the section only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    args.sizes = sorted(args.sizes)
    with bench_workdir("bench-history-") as work, bench_kafka(args.bootstrap, work / "kafka") as bootstrap:
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        ensure_topics(bootstrap, prefix, partitions=3)
        load_before = os.getloadavg()[0]
        pool = Pool()
        print(f"producing {args.new_calls:,} calls ...", file=sys.stderr)
        produce(bootstrap, prefix, pool, args.new_calls)
        rows, art = [], ""
        for size in args.sizes:
            row, found = measure(size, args, bootstrap, prefix, work)
            rows.append(row)
            art = found or art
        section = report(rows, args, pool, (load_before, os.getloadavg()[0]), art)
        print(section)
        if not args.no_write:
            write_section("warehouse-history", section)


if __name__ == "__main__":
    main()
