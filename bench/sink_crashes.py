"""Stress the sink's exactly-once claim: SIGKILL `callstream sink` at random moments, check after every kill.

A producer thread keeps filling fresh topics with chat-heavy traffic (new calls and chats, immediate
duplicates, and re-deliveries of earlier keys) while the sink is started, killed with SIGKILL after a
random delay (some before it has even opened the database, some during writes), and started again.
After every kill, with the DuckDB file free, the invariant is checked directly against Kafka:

  for every (topic, partition) in `_callstream_offsets`, the keys in the parent table from that
  partition are exactly the keys the topic holds below the stored offset, each row carries the
  offset of the key's last delivery below it, and every parent's child rows are all there;
  no parent row comes from a partition with no stored offset; and the dead-letter topic is empty.

At the end one `callstream sink --until-caught-up` must load everything. A failing check keeps the
database (and the one from before the failing run) and the sink's log under --keep, and exits 1.

    python -m bench.sink_crashes --bootstrap 127.0.0.1:9092 --kills 30
    python -m bench.sink_crashes --copies 3 --rounds 2        # three at once, twice, for load
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
from collections import defaultdict
from pathlib import Path

import duckdb
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from callstream.catalogue import DEAD_LETTER, Header, topic
from callstream.fakecalls import CallFactory, Fleet
from callstream.topics import ensure_topics

REPO = Path(__file__).resolve().parents[1]
CALLS, CHATS = "call_analyzed", "chat_analyzed"


class Traffic:
    """Produces analyzed calls and chats in a thread; every delivery report is checked."""

    def __init__(self, bootstrap: str, prefix: str, seed: int, chat_share: float, events: int, rate: float) -> None:
        self.prefix = prefix
        self.factory = CallFactory(Fleet(seed=seed, agents=4), seed=seed, turns=(2, 4))
        self.rng = random.Random(seed)
        self.chat_share = chat_share
        self.events = events
        self.rate = rate
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4",
                                  "enable.idempotence": True})
        self.sent: dict[str, tuple[str, bytes]] = {}  # key -> (event, latest body)
        self.produced = 0
        self.errors: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _report(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()} key={msg.key()!r}: {err}")

    def _send(self, event: str, key: str, body: bytes) -> None:
        self.producer.produce(topic(self.prefix, event), key=key.encode(), value=body, on_delivery=self._report,
                              headers=[(Header.EVENT, event.encode()),
                                       (Header.RECEIVED_AT, str(int(time.time() * 1000)).encode())])
        self.producer.poll(0)
        self.produced += 1

    def _run(self) -> None:
        try:
            chunk = 100
            while self.produced < self.events:
                t0 = time.monotonic()
                for _ in range(chunk):
                    r = self.rng.random()
                    if self.sent and r < 0.04:  # a re-delivery of an earlier call or chat, much later
                        key = self.rng.choice(list(self.sent))
                        event, body = self.sent[key]
                        self._send(event, key, body)
                        continue
                    ev = self.factory.events("chat" if r < self.chat_share else None)[-1]
                    body = ev.body()
                    self.sent[ev.key] = (ev.event, body)
                    self._send(ev.event, ev.key, body)
                    if self.rng.random() < 0.05:
                        self._send(ev.event, ev.key, body)
                left = self.producer.flush(60)
                if left:
                    self.errors.append(f"flush left {left} messages unacknowledged")
                time.sleep(max(0.0, chunk / self.rate - (time.monotonic() - t0)))
        except BaseException as exc:
            self.errors.append(f"producer thread died: {exc!r}")
        finally:
            self.done.set()


class TopicLog:
    """Everything in the run's topics, read by a consumer of our own: (topic, partition) -> [(offset, key)]."""

    def __init__(self, bootstrap: str, prefix: str) -> None:
        self.topics = {t: topic(prefix, t) for t in (CALLS, CHATS, DEAD_LETTER)}
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"crashes-{uuid.uuid4().hex}",
                           "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        meta = self.c.list_topics(timeout=15)
        self.c.assign([TopicPartition(t, p, 0) for t in self.topics.values() for p in meta.topics[t].partitions])
        self.log: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
        self.dead: list[str] = []

    def read_until(self, offsets: dict[tuple[str, int], int], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while any(self._next(tp) < o for tp, o in offsets.items()):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read the topics up to {offsets}")
            self.poll(0.2)

    def _next(self, tp: tuple[str, int]) -> int:
        entries = self.log.get(tp)
        return entries[-1][0] + 1 if entries else 0

    def poll(self, timeout: float) -> None:
        for m in self.c.consume(500, timeout=timeout):
            if m.error() is not None:
                continue
            if m.topic() == self.topics[DEAD_LETTER]:
                reason = dict(m.headers() or []).get(Header.REASON, b"?")
                self.dead.append(f"{m.key()!r}: {reason!r}")
                continue
            tp = (str(m.topic()), int(m.partition() or 0))
            assert m.offset() == self._next(tp), f"gap in {tp}: {m.offset()} after {self._next(tp)}"
            self.log[tp].append((int(m.offset() or 0), (m.key() or b"").decode()))

    def expected(self, t: str, offsets: dict[tuple[str, int], int]) -> dict[tuple[int, str], int]:
        """(partition, key) -> offset of the key's last delivery below the stored offset."""
        want: dict[tuple[int, str], int] = {}
        name = self.topics[t]
        for (tname, p), next_offset in offsets.items():
            if tname != name:
                continue
            for o, key in self.log.get((tname, p), []):
                if o < next_offset:
                    want[(p, key)] = o
        return want


def check(db: Path, log: TopicLog) -> list[str]:
    """What is wrong with the database, measured against the topics (empty: nothing)."""
    if not db.exists():  # killed before it was created
        log.poll(0.05)
        return [f"{len(log.dead)} dead letters: {log.dead[:5]}"] if log.dead else []
    with duckdb.connect(str(db), read_only=True) as con:
        offsets = {(t, p): o for t, p, o in con.execute(
            "SELECT topic, kafka_partition, next_offset FROM _callstream_offsets").fetchall()}
        got = {
            CALLS: {(p, k): o for k, p, o in con.execute("SELECT call_id, kafka_partition, kafka_offset FROM calls").fetchall()},
            CHATS: {(p, k): o for k, p, o in con.execute("SELECT chat_id, kafka_partition, kafka_offset FROM chats").fetchall()},
        }
        counts = {
            CALLS: con.execute("SELECT count(*), count(DISTINCT call_id) FROM calls").fetchone(),
            CHATS: con.execute("SELECT count(*), count(DISTINCT chat_id) FROM chats").fetchone(),
        }
        children = con.execute("""
            SELECT 'utterances of ' || c.call_id FROM calls c LEFT JOIN (SELECT call_id, count(*) n FROM call_utterances GROUP BY ALL) u USING (call_id)
              WHERE c.utterance_count <> coalesce(u.n, 0)
            UNION ALL
            SELECT 'tool calls of ' || c.call_id FROM calls c LEFT JOIN (SELECT call_id, count(*) n FROM call_tool_calls GROUP BY ALL) u USING (call_id)
              WHERE c.tool_call_count <> coalesce(u.n, 0)
            UNION ALL
            SELECT 'messages of ' || c.chat_id FROM chats c LEFT JOIN (SELECT chat_id, count(*) n FROM chat_messages GROUP BY ALL) m USING (chat_id)
              WHERE c.message_count <> coalesce(m.n, 0)
            UNION ALL
            SELECT 'orphan utterances of ' || call_id FROM call_utterances ANTI JOIN calls USING (call_id)
            UNION ALL
            SELECT 'orphan messages of ' || chat_id FROM chat_messages ANTI JOIN chats USING (chat_id)
        """).fetchall()
    log.read_until(offsets)
    log.poll(0.05)
    problems = [f"children: {r[0]}" for r in children[:20]]
    for t in (CALLS, CHATS):
        n, distinct = counts[t] or (0, 0)
        if n != distinct:
            problems.append(f"{t}: {n} rows, {distinct} distinct keys")
        want = log.expected(t, offsets)
        have = got[t]
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        stale = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        for label, keys in (("missing", missing), ("extra", extra), ("not the last delivery", stale)):
            if keys:
                problems.append(f"{t}: {len(keys)} {label}: " + ", ".join(
                    f"[{p}] {k} (want @{want.get((p, k))}, have @{have.get((p, k))})" for p, k in keys[:10]))
    if log.dead:
        problems.append(f"{len(log.dead)} dead letters: {log.dead[:5]}")
    return problems


def _rows(db: Path) -> int:
    if not db.exists():
        return 0
    with duckdb.connect(str(db), read_only=True) as con:
        return int(con.execute("SELECT (SELECT count(*) FROM calls) + (SELECT count(*) FROM chats)").fetchone()[0])  # type: ignore[index]


def _copy_db(db: Path, to: Path) -> None:
    to.mkdir(parents=True, exist_ok=True)
    for f in (db, db.with_name(db.name + ".wal")):
        if f.exists():
            shutil.copy2(f, to / f.name)


def one_copy(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    prefix = f"crash{uuid.uuid4().hex[:10]}"
    ensure_topics(args.bootstrap, prefix, partitions=3)
    work = Path(tempfile.mkdtemp(prefix=f"sink-crashes-{prefix}-"))
    db, parquet = work / "warehouse.duckdb", work / "parquet"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")}
    env.update(CALLSTREAM_KAFKA_BOOTSTRAP=args.bootstrap, CALLSTREAM_TOPIC_PREFIX=prefix,
               CALLSTREAM_WAREHOUSE=str(db), CALLSTREAM_PARQUET_DIR=str(parquet),
               CALLSTREAM_BATCH_MAX_RECORDS=str(args.batch_records), CALLSTREAM_BATCH_MAX_SECONDS="0.3",
               CALLSTREAM_PARQUET_MIN_INTERVAL_SECONDS="0.3", PYTHONUNBUFFERED="1")
    traffic = Traffic(args.bootstrap, prefix, args.seed, args.chat_share, args.events, args.rate)
    log = TopicLog(args.bootstrap, prefix)
    tag = f"[{prefix}]"
    keep = Path(args.keep) / prefix

    def fail(problems: list[str], sink_log: Path | None, what: str) -> int:
        keep.mkdir(parents=True, exist_ok=True)
        _copy_db(db, keep / "after")
        if (work / "before").exists():
            shutil.copytree(work / "before", keep / "before", dirs_exist_ok=True)
        if sink_log is not None and sink_log.exists():
            shutil.copy2(sink_log, keep / "sink.log")
        (keep / "problems.txt").write_text("\n".join(problems) + "\n")
        print(f"{tag} FAILED {what}:\n  " + "\n  ".join(problems) + f"\n  kept in {keep}", flush=True)
        return 1

    traffic.thread.start()
    sink_log = work / "sink.log"
    kills = early = 0
    try:
        for i in range(args.kills):
            shutil.rmtree(work / "before", ignore_errors=True)
            _copy_db(db, work / "before")
            with open(sink_log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "callstream", "sink"], env=env, cwd=work,
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
                return fail([f"the sink exited with {proc.returncode} before the kill",
                             sink_log.read_text(errors="replace")[-3000:]], sink_log, f"run {i}")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            problems = check(db, log)
            if problems:
                return fail(problems, sink_log, f"after kill {i} ({delay:.2f}s)")
            if args.verbose:
                rows = _rows(db)
                print(f"{tag} kill {i} after {delay:.2f}s: ok ({traffic.produced} produced, {rows} loaded)", flush=True)
        traffic.done.wait()
        if traffic.errors:
            return fail(traffic.errors[:20], None, "producing")
        proc = subprocess.run([sys.executable, "-m", "callstream", "sink", "--until-caught-up"], env=env, cwd=work,
                              capture_output=True, timeout=600)
        sink_log.write_bytes(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            return fail([f"the final sink exited with {proc.returncode}"], sink_log, "final run")
        problems = check(db, log)
        with duckdb.connect(str(db), read_only=True) as con:
            stored = dict(((t, p), o) for t, p, o in con.execute(
                "SELECT topic, kafka_partition, next_offset FROM _callstream_offsets").fetchall())
            keys = {k for (k,) in con.execute("SELECT call_id FROM calls UNION ALL SELECT chat_id FROM chats").fetchall()}
        ends = {tp: entries[-1][0] + 1 for tp, entries in log.log.items() if entries}
        if stored != ends:
            problems.append(f"the final run stopped at {stored}, the topics end at {ends}")
        if keys != set(traffic.sent):
            problems.append(f"final: {len(set(traffic.sent) - keys)} keys sent but not loaded, "
                            f"{len(keys - set(traffic.sent))} loaded but not sent")
        if problems:
            return fail(problems, sink_log, "after the final run")
        print(f"{tag} ok: {kills} kills ({early} during start-up), {traffic.produced} messages, "
              f"{len(traffic.sent)} keys", flush=True)
        return 0
    finally:
        traffic.done.wait(timeout=120)
        log.c.close()
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
    ap.add_argument("--keep", default=str(Path(tempfile.gettempdir()) / "sink-crashes-failures"),
                    help="where failures' databases and logs are kept")
    ap.add_argument("--keep-work", action="store_true", help="keep every run's work folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per kill")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    failed = 0
    for r in range(args.rounds):
        if args.copies == 1 and args.rounds == 1:
            args.seed = seed
            return one_copy(args)
        argv = sys.argv[1:]
        procs = []
        for c in range(args.copies):
            s = seed + r * args.copies + c
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.sink_crashes", *_without(argv, "--copies", "--rounds", "--seed"),
                                           "--seed", str(s)], cwd=REPO))
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
