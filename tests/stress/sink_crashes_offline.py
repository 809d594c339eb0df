"""The sink's crash test without Kafka: the real Sink (reader, writer and publisher threads, DuckDB,
Parquet) fed by a deterministic in-memory log, SIGKILLed at random moments and checked after every kill.

A child process runs `warehouse.sink.Sink` with a stand-in consumer that serves a log built
from a seed (analyzed calls and chats, immediate duplicates, later re-deliveries), released at
--rate messages per second from a fixed start, so every restart sees the same log. After every kill
the database must hold, for each stored offset, exactly the keys the log holds below it, from their
last delivery, with every child row. Without a broker a run is cheap, so it reaches many more kills
per minute than tests/stress/sink_crashes.py. The check is the acceptance test's (tests/support/audit.py),
and short loads caught by the sink's checks are counted as in tests/stress/sink_crashes.py.

    python -m tests.stress.sink_crashes_offline run --seed 1 --kills 40
    python -m tests.stress.sink_crashes_offline run --seed 102 --kills 40 -v
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from callstream.fakecalls import CallFactory, Fleet
from kernel.catalogue import Header, topic
from tests.stress.sink_crashes import audited, loaded_rows, short_load_stop
from tests.support.audit import Offsets, copy_db, database_problems, restart_state, stored_offsets
from tests.support.paths import REPO

PREFIX = "fake"
CALLS, CHATS = topic(PREFIX, "call_analyzed"), topic(PREFIX, "chat_analyzed")
PARTS = 3


def build_log(seed: int, n: int, chat_share: float) -> tuple[dict[tuple[str, int], list[tuple[int, str, bytes]]], int]:
    """(topic, partition) -> [(global index, key, body)]."""
    f = CallFactory(Fleet(seed=seed, agents=4), seed=seed, turns=(2, 4))
    rng = random.Random(seed)
    keys: list[tuple[str, str]] = []
    bodies: dict[str, bytes] = {}
    out: dict[tuple[str, int], list[tuple[int, str, bytes]]] = {
        (t, p): [] for t in (CALLS, CHATS) for p in range(PARTS)
    }
    now = 1_790_000_000_000
    g = 0

    def put(t: str, key: str, body: bytes) -> None:
        nonlocal g
        out[(t, zlib.crc32(key.encode()) % PARTS)].append((g, key, body))
        g += 1

    for i in range(n):
        r = rng.random()
        if keys and r < 0.04:
            t, key = keys[rng.randrange(len(keys))]
            put(t, key, bodies[key])
            continue
        ev = f.events("chat" if r < chat_share else None, now_ms=now + i * 50)[-1]
        t = CHATS if ev.event == "chat_analyzed" else CALLS
        body = ev.body()
        keys.append((t, ev.key))
        bodies[ev.key] = body
        put(t, ev.key, body)
        if rng.random() < 0.05:
            put(t, ev.key, body)
    return out, g


class Msg:
    __slots__ = ("_k", "_o", "_p", "_t", "_v")

    def __init__(self, t: str, p: int, o: int, k: str, v: bytes) -> None:
        self._t, self._p, self._o, self._k, self._v = t, p, o, k, v

    def error(self):
        return None

    def topic(self):
        return self._t

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def key(self):
        return self._k.encode()

    def headers(self):
        return [(Header.RECEIVED_AT, b"1790000000000")]

    def timestamp(self):
        return (1, 1790000000000)


class FakeConsumer:
    def __init__(self, log, start: float, rate: float) -> None:
        self.log = log
        self.start = start
        self.rate = rate
        self.pos: dict[tuple[str, int], int] = {}

    def available(self, tp) -> int:
        limit = (time.time() - self.start) * self.rate
        entries = self.log[tp]
        lo, hi = 0, len(entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if entries[mid][0] < limit:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def list_topics(self, timeout=None):
        class T:
            def __init__(self):
                self.partitions = {p: None for p in range(PARTS)}
                self.error = None

        class M:
            topics = {CALLS: T(), CHATS: T()}

        return M()

    def get_watermark_offsets(self, tp, timeout=None):
        return 0, self.available((tp.topic, tp.partition))

    def assign(self, parts):
        for tp in parts:
            self.pos[(tp.topic, tp.partition)] = tp.offset

    def consume(self, num_messages=1, timeout=0):
        got = []
        for tp in sorted(self.pos, key=lambda _: random.random()):
            avail = self.available(tp)
            o = self.pos[tp]
            while o < avail and len(got) < num_messages:
                _, k, v = self.log[tp][o]
                got.append(Msg(tp[0], tp[1], o, k, v))
                o += 1
            self.pos[tp] = o
        if not got and timeout:
            time.sleep(timeout)
        return got

    def position(self, parts):
        return [type(tp)(tp.topic, tp.partition, self.pos.get((tp.topic, tp.partition), -1001)) for tp in parts]

    def commit(self, *a, **k):
        pass

    def close(self):
        pass


def child(args) -> None:
    import pickle

    import warehouse.load
    from warehouse.settings import SinkSettings
    from warehouse.sink import Sink

    log = pickle.loads(Path(args.log).read_bytes())
    cfg = SinkSettings(
        kafka_bootstrap="127.0.0.1:1",
        topic_prefix=PREFIX,
        warehouse=args.db,
        parquet_dir=args.parquet,
        batch_max_records=args.batch_records,
        batch_max_seconds=0.3,
        parquet_min_interval_seconds=0.3,
        checkpoint_seconds=1.0,  # the ledger is checked, checkpointed and trimmed many times per run
    )
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    sys.setswitchinterval(0.0005)
    if args.lose_rows:
        lose_rows(warehouse.load, args.lose_rows, args.lose_silently)
    sink = Sink(cfg, consumer=FakeConsumer(log, args.start, args.rate), create_topics=False)
    print("sink: loading", flush=True)
    sink.run(until_caught_up=args.until_caught_up)
    print("done", flush=True)


def lose_rows(load, share: float, silently: bool) -> None:
    """Make DuckDB "lose" a row of a share of the loads at COMMIT, as it once did: the sink's check
    after the COMMIT then stops it, or, `silently`, does not run (a loss only a restart would see)."""
    rng = random.Random()
    real = load.check_committed

    def check_committed(con, seq: int, rows: dict[str, int]) -> None:
        if rows and rng.random() < share:
            table = rng.choice(sorted(rows))
            con.execute(
                f"DELETE FROM {table} WHERE rowid = (SELECT min(rowid) FROM {table} WHERE _load_seq = ?)", [seq]
            ).fetchall()
            print(f"harness: lost a row of load {seq} in {table}", flush=True)
            if silently:
                return
        real(con, seq, rows)

    load.check_committed = check_committed


OWED_RELOAD: Offsets = {}  # see restart_state


def check(db: Path, log) -> list[str]:
    """The acceptance test's audit, with the fixed log in place of the topics."""
    offsets = stored_offsets(db)
    if offsets is None:
        return []
    db, offsets, strict = restart_state(db, OWED_RELOAD)

    def last_deliveries(suffix: str, offsets: dict[tuple[str, int], int]) -> dict[tuple[int, str], int]:
        name = topic(PREFIX, suffix)
        return {(p, k): i for (t, p), o in offsets.items() if t == name for i, (_, k, _) in enumerate(log[(t, p)][:o])}

    return database_problems(db, offsets, last_deliveries, strict)


def parent(args) -> int:
    import pickle

    log, total = build_log(args.seed, args.events, args.chat_share)
    work = Path(tempfile.mkdtemp(prefix=f"fake-sink-{args.seed}-"))
    (work / "log.pickle").write_bytes(pickle.dumps(log))
    db, parquet = work / "w.duckdb", work / "parquet"
    rng = random.Random(args.seed)
    start = time.time() + 1.0
    base = [
        sys.executable,
        "-m",
        "tests.stress.sink_crashes_offline",
        "child",
        "--db",
        str(db),
        "--parquet",
        str(parquet),
        "--seed",
        str(args.seed),
        "--events",
        str(args.events),
        "--chat-share",
        str(args.chat_share),
        "--rate",
        str(args.rate),
        "--start",
        str(start),
        "--log",
        str(work / "log.pickle"),
        "--batch-records",
        str(args.batch_records),
    ]
    losing = ["--lose-rows", str(args.lose_rows), *(["--lose-silently"] if args.lose_silently else [])]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")}
    out_log = work / "child.log"
    short_stops = reloads = 0
    for i in range(args.kills):
        shutil.rmtree(work / "before", ignore_errors=True)
        copy_db(db, work / "before")
        with open(out_log, "wb") as out:
            proc = subprocess.Popen([*base, *losing], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        t0 = time.monotonic()
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0, 1.0))
        else:
            while b"sink: loading" not in out_log.read_bytes() and proc.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, args.max_delay))
        if proc.poll() is not None:
            said = out_log.read_text()
            stop = short_load_stop(said)
            if stop is None:
                print(f"[{args.seed}] child exited early: {said[-2000:]}")
                return 1
            short_stops += 1  # the sink stopped as it should; the next start carries on
            print(f"[{args.seed}] kill {i}: the sink stopped on a short load: {stop}", flush=True)
        else:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        problems, found = audited(lambda: check(db, log))
        for reload in found:
            reloads += 1
            print(f"[{args.seed}] kill {i}: {reload}", flush=True)
        if problems:
            keep = Path(args.keep_failures) / f"{args.seed}-{i}"
            copy_db(db, keep / "after")
            shutil.copytree(work / "before", keep / "before", dirs_exist_ok=True)
            shutil.copy2(out_log, keep / "child.log")
            print(
                f"[{args.seed}] FAILED after kill {i} ({time.monotonic() - t0:.2f}s): {problems}\n kept in {keep}",
                flush=True,
            )
            return 1
        if args.verbose:
            print(f"[{args.seed}] kill {i} after {time.monotonic() - t0:.2f}s ok, {loaded_rows(db)} rows", flush=True)
    wait = start + total / args.rate - time.time()
    if wait > 0:
        time.sleep(wait)
    proc = subprocess.run([*base, "--until-caught-up"], env=env, capture_output=True, cwd=REPO)
    problems = check(db, log)
    offsets = stored_offsets(db)
    ends = {tp: len(v) for tp, v in log.items() if v}
    if proc.returncode != 0 or offsets != ends:
        problems.append(
            f"final run: rc {proc.returncode}, offsets {offsets} vs {ends}: "
            f"{proc.stdout[-2000:]!r} {proc.stderr[-2000:]!r}"
        )
    if problems:
        print(f"[{args.seed}] FAILED final: {problems}", flush=True)
        return 1
    print(
        f"[{args.seed}] ok: {args.kills} kills, {total} messages, {short_stops} stops on a short load, "
        f"{reloads} short loads found at a restart",
        flush=True,
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["run", "child"])
    ap.add_argument("--db")
    ap.add_argument("--parquet")
    ap.add_argument("--log")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--chat-share", type=float, default=0.06)
    ap.add_argument("--rate", type=float, default=400.0)
    ap.add_argument("--start", type=float, default=0.0)
    ap.add_argument("--batch-records", type=int, default=300)
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--max-delay", type=float, default=2.0)
    ap.add_argument("--until-caught-up", action="store_true")
    ap.add_argument(
        "--lose-rows",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="exercise the repair: delete a row of this share of the loads right after their COMMIT "
        "(not in the final run)",
    )
    ap.add_argument(
        "--lose-silently",
        action="store_true",
        help="with --lose-rows, skip the sink's check after COMMIT, so only its next start sees the loss",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work folder of a passing run")
    ap.add_argument(
        "--keep-failures",
        default=str(Path(tempfile.gettempdir()) / "sink-crashes-offline"),
        help="where a failure's databases (before and after the failing run) and log are kept",
    )
    args = ap.parse_args()
    if args.mode == "child":
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
