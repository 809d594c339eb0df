"""Stress the sink's exactly-once claim: SIGKILL `callstream sink` at random moments, check after every kill.

A producer thread keeps filling fresh topics with chat-heavy traffic (new calls and chats, immediate
duplicates, and re-deliveries of earlier keys) while the sink is started, killed with SIGKILL after a
random delay (some before it has even opened the database, some during writes), and started again.
After every kill, with the DuckDB file free, the invariant is checked directly against Kafka:

  for every (topic, partition) in `_callstream_offsets`, the keys in the parent table from that
  partition are exactly the keys the topic holds below the stored offset, each row carries the
  offset of the key's last delivery below it, and every parent's child rows are all there;
  no parent row comes from a partition with no stored offset; and the dead-letter topic is empty.

It is checked on the database as the sink's next start leaves it: a load that the load ledger finds
short there is undone and reloaded (counted as "short loads found at a restart"), and a sink that
stops on a batch DuckDB stored short is restarted (counted as "stops on a short load").

At the end one `callstream sink --until-caught-up` must load everything. A failing check keeps the
database (and the one from before the failing run) and the sink's log under --keep, and exits 1.

    python -m tests.stress.sink_crashes --bootstrap 127.0.0.1:9092 --kills 30
    python -m tests.stress.sink_crashes --copies 3 --rounds 2        # three at once, twice, for load
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
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import duckdb
from confluent_kafka import TopicPartition

from kernel.catalogue import topic
from kernel.topics import ensure_topics
from tests.support.audit import TopicLog, audit, copy_db, stored_offsets
from tests.support.paths import REPO
from tests.support.traffic import TrafficProducer


class Traffic:
    """Produces analyzed calls and chats in a thread, with the acceptance test's producer."""

    def __init__(self, bootstrap: str, prefix: str, seed: int, chat_share: float, events: int, rate: float) -> None:
        self.out = TrafficProducer(bootstrap, prefix, seed=seed, turns=(2, 4))
        self.chat_share = chat_share
        self.events = events
        self.rate = rate
        self.sent: dict[str, tuple[str, bytes]] = {}  # key -> (event, latest body)
        self.produced = 0
        self.errors: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _send(self, event: str, key: str, body: bytes) -> None:
        self.out.send_raw(event, key, body)
        self.produced += 1

    def _run(self) -> None:
        rng, factory = self.out.rng, self.out.factory
        try:
            chunk = 100
            while self.produced < self.events:
                t0 = time.monotonic()
                for _ in range(chunk):
                    r = rng.random()
                    if self.sent and r < 0.04:  # a re-delivery of an earlier call or chat, much later
                        key = rng.choice(list(self.sent))
                        event, body = self.sent[key]
                        self._send(event, key, body)
                        continue
                    ev = factory.events("chat" if r < self.chat_share else None)[-1]
                    body = ev.body()
                    self.sent[ev.key] = (ev.event, body)
                    self._send(ev.event, ev.key, body)
                    if rng.random() < 0.05:
                        self._send(ev.event, ev.key, body)
                left = self.out.producer.flush(60)
                if left:
                    self.errors.append(f"flush left {left} messages unacknowledged")
                time.sleep(max(0.0, chunk / self.rate - (time.monotonic() - t0)))
        except BaseException as exc:
            self.errors.append(f"producer thread died: {exc!r}")
        finally:
            self.errors += self.out.refused
            self.done.set()


def loaded_rows(db: Path) -> int:
    if stored_offsets(db) is None:
        return 0
    with duckdb.connect(str(db), read_only=True) as con:
        return int(con.execute("SELECT (SELECT count(*) FROM calls) + (SELECT count(*) FROM chats)").fetchone()[0])  # type: ignore[index]


# What the sink says when it stops because DuckDB stored a batch short (warehouse/load.py).
SHORT_LOAD_STOPS = (
    "rolled back, so nothing of this batch is stored",
    "after COMMIT; stopping",
    # the ledger's check before a periodic CHECKPOINT (warehouse.sink.Sink._trim_ledger)
    "stopping, the next start reloads these loads",
)


def short_load_stop(said: str) -> str | None:
    """The sink's line if it stopped because DuckDB stored a batch short, else None."""
    lines = [ln for ln in said.splitlines() if any(s in ln for s in SHORT_LOAD_STOPS)]
    return lines[-1] if lines else None


def audited(check: Callable[[], list[str]]) -> tuple[list[str], list[str]]:
    """An audit's problems, and the short loads it found that the sink's next start reloads."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        problems = check()
    return problems, [str(w.message) for w in seen]


def one_copy(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    prefix = f"crash{uuid.uuid4().hex[:10]}"
    ensure_topics(args.bootstrap, prefix, partitions=3)
    work = Path(tempfile.mkdtemp(prefix=f"sink-crashes-{prefix}-"))
    db, parquet = work / "warehouse.duckdb", work / "parquet"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=args.bootstrap,
        CALLSTREAM_TOPIC_PREFIX=prefix,
        CALLSTREAM_WAREHOUSE=str(db),
        CALLSTREAM_PARQUET_DIR=str(parquet),
        CALLSTREAM_BATCH_MAX_RECORDS=str(args.batch_records),
        CALLSTREAM_BATCH_MAX_SECONDS="0.3",
        CALLSTREAM_PARQUET_MIN_INTERVAL_SECONDS="0.3",
        PYTHONUNBUFFERED="1",
    )
    traffic = Traffic(args.bootstrap, prefix, args.seed, args.chat_share, args.events, args.rate)
    log = TopicLog(args.bootstrap, prefix)
    tag = f"[{prefix}]"
    keep = Path(args.keep) / prefix

    def fail(problems: list[str], sink_log: Path | None, what: str) -> int:
        keep.mkdir(parents=True, exist_ok=True)
        copy_db(db, keep / "after")
        if (work / "before").exists():
            shutil.copytree(work / "before", keep / "before", dirs_exist_ok=True)
        if sink_log is not None and sink_log.exists():
            shutil.copy2(sink_log, keep / "sink.log")
        (keep / "problems.txt").write_text("\n".join(problems) + "\n")
        print(f"{tag} FAILED {what}:\n  " + "\n  ".join(problems) + f"\n  kept in {keep}", flush=True)
        return 1

    traffic.thread.start()
    sink_log = work / "sink.log"
    kills = early = short_stops = reloads = 0
    proc: subprocess.Popen[bytes] | None = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))  # so that `finally` kills our sink
    try:
        for i in range(args.kills):
            shutil.rmtree(work / "before", ignore_errors=True)
            copy_db(db, work / "before")
            with open(sink_log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "callstream", "sink"],
                    env=env,
                    cwd=work,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            t0 = time.monotonic()
            if rng.random() < 0.25:  # anywhere in the start-up: opening, WAL replay, assigning
                early += 1
                time.sleep(rng.uniform(0.0, 1.5))
            else:  # while it loads
                while b"sink: loading" not in sink_log.read_bytes() and proc.poll() is None:
                    if time.monotonic() - t0 > 60:
                        return fail(["the sink did not start loading in 60 s"], sink_log, f"run {i}")
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, args.max_delay))
            delay = time.monotonic() - t0
            if proc.poll() is not None:
                said = sink_log.read_text(errors="replace")
                stop = short_load_stop(said)
                if stop is None:
                    return fail(
                        [f"the sink exited with {proc.returncode} before the kill", said[-3000:]], sink_log, f"run {i}"
                    )
                short_stops += 1  # the sink stopped as it should; the next start carries on
                print(f"{tag} run {i}: the sink stopped on a short load: {stop}", flush=True)
            else:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            problems, found = audited(lambda: audit(db, log))
            reloads += len(found)
            for reload in found:
                print(f"{tag} after run {i}: {reload}", flush=True)
            if problems:
                return fail(problems, sink_log, f"after kill {i} ({delay:.2f}s)")
            if args.verbose:
                rows = loaded_rows(db)
                print(f"{tag} kill {i} after {delay:.2f}s: ok ({traffic.produced} produced, {rows} loaded)", flush=True)
        traffic.done.wait()
        if traffic.errors:
            return fail(traffic.errors[:20], None, "producing")
        # As in the acceptance test, the final run loads with the default batch size.
        final_env = {k: v for k, v in env.items() if k != "CALLSTREAM_BATCH_MAX_RECORDS"}
        final = subprocess.run(
            [sys.executable, "-m", "callstream", "sink", "--until-caught-up"],
            env=final_env,
            cwd=work,
            capture_output=True,
            timeout=600,
        )
        sink_log.write_bytes(final.stdout + final.stderr)
        if final.returncode != 0:
            return fail([f"the final sink exited with {final.returncode}"], sink_log, "final run")
        problems = audit(db, log)
        stored = stored_offsets(db)
        with duckdb.connect(str(db), read_only=True) as con:
            keys = {
                k for (k,) in con.execute("SELECT call_id FROM calls UNION ALL SELECT chat_id FROM chats").fetchall()
            }
        ends = {}
        for name in (topic(prefix, "call_analyzed"), topic(prefix, "chat_analyzed")):
            for part in range(3):
                ends[(name, part)] = log.consumer.get_watermark_offsets(TopicPartition(name, part), timeout=15)[1]
        if stored != ends:
            problems.append(f"the final run stopped at {stored}, the topics end at {ends}")
        if keys != set(traffic.sent):
            problems.append(
                f"final: {len(set(traffic.sent) - keys)} keys sent but not loaded, "
                f"{len(keys - set(traffic.sent))} loaded but not sent"
            )
        if problems:
            return fail(problems, sink_log, "after the final run")
        print(
            f"{tag} ok: {kills} kills ({early} during start-up), {traffic.produced} messages, "
            f"{len(traffic.sent)} keys, {short_stops} stops on a short load, {reloads} short loads found at a "
            "restart",
            flush=True,
        )
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        traffic.done.wait(timeout=120)
        log.close()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default=os.environ.get("CALLSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs per copy and round (default 20)")
    ap.add_argument("--events", type=int, default=12000, help="new calls and chats produced per copy (default 12000)")
    ap.add_argument("--rate", type=float, default=2500.0, help="events per second produced (default 2500)")
    ap.add_argument("--chat-share", type=float, default=0.6, help="share of new events that are chats (default 0.6)")
    ap.add_argument("--batch-records", type=int, default=300, help="CALLSTREAM_BATCH_MAX_RECORDS (default 300)")
    ap.add_argument("--max-delay", type=float, default=3.0, help="longest run before a kill, seconds (default 3)")
    ap.add_argument("--copies", type=int, default=1, help="independent copies at once, for load (default 1)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything this many times (default 1)")
    ap.add_argument("--seed", type=int, default=None, help="first copy's seed (default: random)")
    ap.add_argument(
        "--keep",
        default=str(Path(tempfile.gettempdir()) / "sink-crashes-failures"),
        help="where failures' databases and logs are kept",
    )
    ap.add_argument("--keep-work", action="store_true", help="keep every run's work folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per kill")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    failed = 0
    procs: list[subprocess.Popen[bytes]] = []
    signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in procs])
    for r in range(args.rounds):
        if args.copies == 1 and args.rounds == 1:
            args.seed = seed
            return one_copy(args)
        argv = sys.argv[1:]
        procs.clear()
        for c in range(args.copies):
            s = seed + r * args.copies + c
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.stress.sink_crashes",
                        *_without(argv, "--copies", "--rounds", "--seed"),
                        "--seed",
                        str(s),
                    ],
                    cwd=REPO,
                )
            )
        failed += sum(p.wait() != 0 for p in procs)
        print(f"round {r + 1}/{args.rounds}: {failed} failed copies so far", flush=True)
    return 1 if failed else 0


def _without(argv: list[str], *names: str) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
