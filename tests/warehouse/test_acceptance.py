"""Issue 5's acceptance tests against the real broker: SIGKILLs during a load, and a reader during a load."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import duckdb
import orjson
import pytest

from tests.support.audit import assert_parquet_equals_duckdb, audit, stored_offsets
from warehouse.errors import WarehouseError
from warehouse.read import connect, refresh

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CRASH_CALLS = 20_000


def test_sigkill_at_random_moments_loses_and_doubles_nothing(
    traffic, start_service, sink_env, run_sink_once, warehouse_paths, topic_log
):
    db, parquet = warehouse_paths
    p = traffic(seed=21, turns=(2, 4))
    rng = random.Random(5)
    chunks = 8
    env = {**sink_env, "CALLSTREAM_BATCH_MAX_RECORDS": "300"}
    failed: list[BaseException] = []

    def produce_chunk() -> None:
        # Calls arrive while the sink runs: new ones, repeated deliveries, and calls delivered again later.
        try:
            target = len(p.sent.calls) + CRASH_CALLS // chunks
            earlier = list(p.sent.calls)
            while len(p.sent.calls) < target:
                p.send(min(250, target - len(p.sent.calls)), duplicates=0.05)
                p.flush()
            for call_id in rng.sample(earlier, min(100, len(earlier))):
                p.send_raw(
                    "call_analyzed", call_id, orjson.dumps({"event": "call_analyzed", "call": p.sent.calls[call_id]})
                )
            p.flush()
        except BaseException as exc:  # a thread's exception would otherwise only be a warning
            failed.append(exc)

    loaded_at_kill = []
    for i in range(chunks):
        producer = threading.Thread(target=produce_chunk)
        producer.start()
        sink = start_service("sink", "sink", env=env)
        time.sleep(rng.uniform(0.8, 2.5))
        assert sink.proc.poll() is None, sink.output()[-3000:]
        sink.proc.send_signal(signal.SIGKILL)
        sink.proc.wait()
        producer.join()
        if failed:
            raise AssertionError(f"producing chunk {i} failed") from failed[0]
        # Between runs the file is free: exactly what the killed sink's stored offsets say it loaded is
        # there, once (a kill during start-up may leave no database or no tables yet).
        problems = audit(db, topic_log)
        assert not problems, "\n".join([f"after kill {i}:", *problems, "the killed sink said:", sink.output()[-3000:]])
        loaded_at_kill.append(0 if stored_offsets(db) is None else _calls(db))
    assert len(p.sent.calls) == CRASH_CALLS
    assert p.sent.deliveries > CRASH_CALLS + len(p.sent.chats)  # duplicate deliveries are in the input
    # Killed at least five times while the load was going on.
    assert sum(n < CRASH_CALLS for n in loaded_at_kill) >= 5, loaded_at_kill
    out = run_sink_once()
    assert " 0 dead letters" in out, out[-3000:]

    problems = audit(db, topic_log)
    assert not problems, "\n".join(["after the final run:", *problems, out[-3000:]])
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT call_id) FROM calls").fetchall() == [
            (CRASH_CALLS, CRASH_CALLS)
        ]
        assert {r[0] for r in con.execute("SELECT call_id FROM calls").fetchall()} == set(p.sent.calls)
        per_call = dict(con.execute("SELECT call_id, count(*) FROM call_utterances GROUP BY ALL").fetchall())
        want = {cid: p.sent.utterances(cid) for cid in p.sent.calls}
        assert per_call == {cid: n for cid, n in want.items() if n}
        assert con.execute("SELECT count(*) FROM call_utterances").fetchall() == [(p.sent.total_utterances(),)]
        chats = {r[0] for r in con.execute("SELECT chat_id FROM chats").fetchall()}
        assert (sorted(set(p.sent.chats) - chats), sorted(chats - set(p.sent.chats))) == ([], [])
        assert con.execute("SELECT count(*) FROM chats").fetchall() == [(len(p.sent.chats),)]
        per_chat = dict(con.execute("SELECT chat_id, count(*) FROM chat_messages GROUP BY ALL").fetchall())
        assert per_chat == {cid: len(c["message_with_tool_calls"]) for cid, c in p.sent.chats.items()}
    counts = assert_parquet_equals_duckdb(db, parquet)
    assert counts["calls"] == CRASH_CALLS
    assert counts["call_utterances"] == p.sent.total_utterances()
    assert counts["chats"] == len(p.sent.chats)
    assert not list(parquet.rglob("*.tmp"))


def _calls(db: Path) -> int:
    with duckdb.connect(str(db), read_only=True) as con:
        return int(con.execute("SELECT count(*) FROM calls").fetchall()[0][0])


def test_a_reader_never_sees_a_half_loaded_call(traffic, start_service, sink_env, warehouse_paths):
    _, parquet = warehouse_paths
    p = traffic(seed=22, turns=(2, 8))
    p.send(1500, duplicates=0.05)
    p.flush()
    sink = start_service("sink", "sink", env={**sink_env, "CALLSTREAM_BATCH_MAX_RECORDS": "200"})

    def produce_more() -> None:
        for _ in range(25):
            p.send(100, duplicates=0.05)
            p.flush()
            time.sleep(0.1)

    producer = threading.Thread(target=produce_more)
    producer.start()
    generations: set[str] = set()
    reads = 0
    seen = 0
    con = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (producer.is_alive() or seen < len(p.sent.calls)):
        assert sink.proc.poll() is None, sink.output()[-3000:]
        try:
            if con is None:
                con = connect(parquet)
            gen = refresh(con, parquet)
        except WarehouseError:  # before the sink's first publish
            time.sleep(0.1)
            continue
        generations.add(gen)
        rows = con.execute(
            "SELECT c.call_id, c.utterance_count, count(u.call_id) FROM calls c "
            "LEFT JOIN call_utterances u USING (call_id) GROUP BY ALL"
        ).fetchall()
        sent = dict(p.sent.calls)
        for call_id, stored_count, utterances in rows:
            want = p.sent.utterances(call_id) if call_id in sent else None
            assert (stored_count, utterances) == (want, want), f"{call_id} is half-loaded in snapshot {gen}"
        assert con.execute("SELECT count(*) - count(DISTINCT call_id) FROM calls").fetchall() == [(0,)]
        seen = len(rows)
        reads += 1
    producer.join()
    assert seen == len(p.sent.calls)
    assert len(generations) >= 3 and reads >= 3
    assert sink.stop() == 0, sink.output()[-3000:]
