"""`make bench-ops`: backfill, replay and forget, each against what a user would do instead.

Measures, with callstream's simulated calls (default turns):
  1. `callstream backfill` of a JSON array file, at two sizes: seconds, calls/s, CPU and peak RSS (it
     streams, so its memory should not follow the file); beside it `--dry-run` (reading and checking
     only), and the script a user would write (`json.load` the file, then produce every call);
  2. `callstream replay dead-letter` of routable dead letters (routing, a Kafka transaction per 500
     with the group's offsets), against producing the same messages with an idempotent producer and
     no transaction (the ceiling: what replay adds is routing and transactions);
  3. `callstream warehouse forget --call-id` of one call on the warehouse the sink built from the
     backfilled calls (rows, Parquet files and snapshots, and the DuckDB file rewritten), against a
     DELETE in DuckDB alone (which leaves the bytes in the file).
Prints a markdown table and replaces the ops section of bench/RESULTS.md.

    python -m bench.ops                      # 4,000 and 16,000 calls
    python -m bench.ops --calls 1000 4000    # a quick one
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
from confluent_kafka import Producer

from bench.report import bench_kafka, bench_workdir, machine, write_section
from callstream.fakecalls import CallFactory, Fleet
from kernel.catalogue import Header, topic
from kernel.topics import ensure_topics

REPO = Path(__file__).resolve().parents[1]

# What a user would write without `callstream backfill`: load the file, produce each call.
NAIVE = """
import json, sys
from confluent_kafka import Producer
p = Producer({"bootstrap.servers": sys.argv[1], "enable.idempotence": True, "linger.ms": 20})
for c in json.load(open(sys.argv[3])):
    body = json.dumps({"event": "call_analyzed", "call": c}).encode()
    while True:
        try:
            p.produce(sys.argv[2], key=c["call_id"].encode(), value=body, headers=[("event", b"call_analyzed")])
            break
        except BufferError:
            p.poll(0.1)
    p.poll(0)
assert p.flush(120) == 0
"""


@dataclass
class Run:
    seconds: float
    cpu: float
    rss_mb: float


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict[str, str], cwd: Path) -> Run:
    """Wall-clock, CPU and peak RSS of one command. The peak is read from /proc while it runs: the
    rusage figure would count this (big) process's pages from before the child's exec."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _hwm_kb(proc.pid))
        time.sleep(0.02)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed with {os.waitstatus_to_exitcode(status)}")
    return Run(time.monotonic() - t0, usage.ru_utime + usage.ru_stime, peak / 1024)


def calls(n: int, distinct: int = 1000) -> list[dict[str, Any]]:
    """`n` analyzed call objects: `distinct` simulated ones, re-keyed."""
    f = CallFactory(Fleet(seed=5, agents=5), seed=5)
    pool: list[dict[str, Any]] = []
    while len(pool) < min(n, distinct):
        payload = f.events()[-1].payload
        if "call" in payload:
            pool.append(payload["call"])
    return [{**pool[i % len(pool)], "call_id": f"call_{i:012d}"} for i in range(n)]


def env_for(bootstrap: str, prefix: str, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=bootstrap,
        CALLSTREAM_TOPIC_PREFIX=prefix,
        CALLSTREAM_WAREHOUSE=str(work / "warehouse.duckdb"),
        CALLSTREAM_PARQUET_DIR=str(work / "parquet"),
        CALLSTREAM_LOG_LEVEL="WARNING",
    )
    return env


def row(path: str, n: int, r: Run, note: str) -> str:
    rss = f"{r.rss_mb:.0f} MB" if r.rss_mb else ""
    return (
        f"| {path} | {n:,} | {r.seconds:.1f} | {n / r.seconds:,.0f} | {r.cpu:.1f} | {r.cpu / n * 1e6:,.0f} | {rss} "
        f"| {note} |"
    )


def bench_backfill(bootstrap: str, sizes: list[int], work: Path) -> tuple[list[str], str, str]:
    """Rows of the table, the file sizes, and the prefix the largest file went to (for forget)."""
    rows, size_note, prefix = [], "", ""
    for n in sizes:
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        ensure_topics(bootstrap, prefix, partitions=3)
        path = work / f"calls-{n}.json"
        with path.open("w") as f:
            json.dump(calls(n), f)
        mb = path.stat().st_size / 1e6
        size_note += f"{n:,} calls: {mb:,.0f} MB; "
        env = env_for(bootstrap, prefix, work)
        cb = [sys.executable, "-m", "callstream", "backfill", "--no-progress"]
        print(f"backfill of {n} calls ({mb:.0f} MB) ...", file=sys.stderr)
        dry = measure([*cb, "--dry-run", str(path)], env, work)
        real = measure([*cb, str(path)], env, work)
        naive_prefix = f"bench{uuid.uuid4().hex[:8]}"
        ensure_topics(bootstrap, naive_prefix, partitions=3)
        naive = measure(
            [sys.executable, "-c", NAIVE, bootstrap, topic(naive_prefix, "call_analyzed"), str(path)], env, work
        )
        rows += [
            row(f"`callstream backfill`, {mb:,.0f} MB JSON array", n, real, "stream, check, produce, wait for acks"),
            row(f"`callstream backfill --dry-run`, {mb:,.0f} MB", n, dry, "stream and check only"),
            row(f"`json.load` + produce, {mb:,.0f} MB", n, naive, "the script a user would write"),
        ]
        path.unlink()
    return rows, size_note.rstrip("; "), prefix


def bench_replay(bootstrap: str, n: int, work: Path) -> list[str]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, prefix, partitions=3)
    bodies = [orjson.dumps({"event": "call_analyzed", "call": c}) for c in calls(n)]
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50, "compression.type": "lz4"})
    for b in bodies:
        _produce(p, topic(prefix, "dead_letter"), None, b, [(Header.EVENT, b"")])
    p.flush(120)
    print(f"replay of {n} dead letters ...", file=sys.stderr)
    replay = measure(
        [sys.executable, "-m", "callstream", "replay", "dead-letter", "--no-progress"],
        env_for(bootstrap, prefix, work),
        work,
    )
    t0, c0 = time.monotonic(), time.process_time()
    ceiling = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for i, b in enumerate(bodies):
        _produce(ceiling, topic(prefix, "call_ended"), f"k{i}".encode(), b, [(Header.EVENT, b"call_analyzed")])
    ceiling.flush(120)
    ceil = Run(time.monotonic() - t0, time.process_time() - c0, 0)
    return [
        row("`callstream replay dead-letter`", n, replay, "routing, a transaction per 500 with the offsets"),
        row("idempotent producer, no routing, no transaction", n, ceil, "ceiling; in-process (RSS not separate)"),
    ]


def _produce(
    p: Producer, t: str, key: bytes | None, value: bytes, headers: list[tuple[str, str | bytes | None]]
) -> None:
    while True:
        try:
            p.produce(t, key=key, value=value, headers=headers)
            break
        except BufferError:
            p.poll(0.05)
    p.poll(0)


def bench_forget(bootstrap: str, prefix: str, n: int, work: Path) -> list[str]:
    env = env_for(bootstrap, prefix, work)
    print("building the warehouse with the sink ...", file=sys.stderr)
    measure([sys.executable, "-m", "callstream", "sink", "--until-caught-up"], env, work)
    db = work / "warehouse.duckdb"
    size = db.stat().st_size / 1e6
    files = sum(1 for _ in (work / "parquet").rglob("*.parquet"))
    shutil.copy(db, work / "copy.duckdb")
    print("forget ...", file=sys.stderr)
    forget = measure(
        [sys.executable, "-m", "callstream", "warehouse", "forget", "--no-progress", "--call-id", "call_000000000007"],
        env,
        work,
    )
    t0 = time.monotonic()
    with duckdb.connect(str(work / "copy.duckdb")) as con:
        for t in ("call_utterances", "call_tool_calls", "calls"):
            con.execute(f"DELETE FROM {t} WHERE call_id = 'call_000000000008'").fetchall()
        con.execute("CHECKPOINT").fetchall()
    delete = Run(time.monotonic() - t0, 0, 0)
    note = f"a {size:,.0f} MB DuckDB file, {files} Parquet names (tree and snapshots)"
    return [
        f"| `callstream warehouse forget --call-id` (1 call) | {n:,} stored | {forget.seconds:.1f} | | "
        f"{forget.cpu:.1f} | | {forget.rss_mb:.0f} MB | {note}; DuckDB file and every file holding it rewritten |",
        f"| DELETE in DuckDB alone (1 call) | {n:,} stored | {delete.seconds:.1f} | | | | | "
        "in-process; the deleted rows' bytes stay in the file and every Parquet file |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, nargs="+", default=[4000, 16000], help="file sizes in calls")
    ap.add_argument("--replay", type=int, default=20000, help="dead letters to replay")
    ap.add_argument("--bootstrap", default=os.environ.get("CALLSTREAM_KAFKA_BOOTSTRAP"), help="an existing broker")
    ap.add_argument("--no-write", action="store_true", help="print the table only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    with bench_workdir("bench-ops-") as work, bench_kafka(args.bootstrap, work / "kafka") as bootstrap:
        load_before = os.getloadavg()
        backfill_rows, sizes, prefix = bench_backfill(bootstrap, args.calls, work)
        replay_rows = bench_replay(bootstrap, args.replay, work)
        forget_rows = bench_forget(bootstrap, prefix, args.calls[-1], work)
        load_after = os.getloadavg()
        lines = [
            "## Backfill, replay, forget",
            "",
            f"`python -m bench.ops` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {machine()}, one local Kafka broker "
            f"on the same cores. Load average {load_before[0]:.2f} / {load_before[1]:.2f} (1 / 5 min) at the start, "
            f"{load_after[0]:.2f} / {load_after[1]:.2f} at the end (the machine is shared: treat wall-clock "
            "figures as a floor, CPU seconds move less).",
            "",
            f"Simulated analyzed calls, default turns, in JSON array files ({sizes}).",
            "",
            "| path | calls | seconds | calls/s | CPU seconds | CPU µs per call | peak RSS | note |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
            *backfill_rows,
            *replay_rows,
            *forget_rows,
            "",
            "Backfill's memory stays flat as the file grows (it holds one call, a 1 MiB chunk and at most 32 MiB "
            "queued for Kafka), where `json.load` holds the whole file as Python objects. The commands' seconds "
            "include starting the process (about a second); replay's also creating the topics and fencing an "
            "earlier run, and its CPU per event beyond the ceiling's is routing and the transactions. Forget's "
            "time is mostly the copy of the DuckDB file: it follows the file's size, not the number of calls "
            "erased (erase many at once with repeated options).",
            "Re-run: `make bench-ops` (`BENCH_ARGS='--calls 1000 4000 --replay 5000'` for a quick one).",
        ]
        section = "\n".join(lines)
        print(section)
        if not args.no_write:
            write_section("ops", section)


if __name__ == "__main__":
    main()
