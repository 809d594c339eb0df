"""Issue 16's acceptance test: two lake sinks on PostgreSQL + S3Proxy, SIGKILLed at random moments
while 20,000 calls arrive; a DuckDB reader checks every commit it sees while they run, and at the end
every table holds exactly what the topics hold."""

from __future__ import annotations

import random
import signal
import threading
import time

import orjson
import pytest

from tests.support.audit import TopicLog
from tests.support.kafka import topic_counts
from tests.support.lake import lake_problems, stored_offsets
from warehouse.lake.read import connect

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

CALLS = 20_000
KILLS_PER_SINK = 5


class _Reader(threading.Thread):
    """Audits every commit it can read while the sinks run, against a topic log of its own."""

    def __init__(self, catalog, bootstrap: str, prefix: str, work) -> None:
        super().__init__(daemon=True)
        self.catalog, self.work = catalog, work
        self.log = TopicLog(bootstrap, prefix)
        self.stop = threading.Event()
        self.problems: list[str] = []
        self.commits: set[tuple[int, ...]] = set()

    def run(self) -> None:
        try:
            while not self.stop.is_set() and not self.problems:
                problems = lake_problems(self.catalog, self.log, self.work)
                reader = connect(catalog=self.catalog)
                self.commits.add(tuple(sorted(reader.snapshots.values())))
                reader.close()
                self.problems += problems
        except BaseException as exc:
            self.problems.append(f"the reader failed: {exc!r}")
        finally:
            self.log.close()


def test_two_sinks_killed_at_random_lose_and_double_nothing(
    traffic, start_service, shared_lake, lake_catalog, kafka_bootstrap, topics, topic_log, tmp_path
):
    p = traffic(seed=51, turns=(2, 4))
    rng = random.Random(16)
    env = {**shared_lake, "CALLSTREAM_LAKE_BATCH_MAX_RECORDS": "400", "CALLSTREAM_LAKE_BATCH_MAX_SECONDS": "0.5"}
    catalog = lake_catalog(shared_lake)
    sinks = {
        name: start_service("sink", "sink", env={**env, "CALLSTREAM_LAKE_INSTANCE_ID": name}) for name in ("a", "b")
    }
    reader = _Reader(catalog, kafka_bootstrap, topics, tmp_path / "reader")
    (tmp_path / "reader").mkdir()
    reader.start()

    kills = [name for name in sinks for _ in range(KILLS_PER_SINK)]
    rng.shuffle(kills)
    loaded_at_kill = []
    per_kill = CALLS // len(kills)
    for name in kills:
        target = len(p.sent.calls) + per_kill
        earlier = list(p.sent.calls)
        while len(p.sent.calls) < target:
            p.send(min(250, target - len(p.sent.calls)), duplicates=0.05)
        for call_id in rng.sample(earlier, min(50, len(earlier))):  # delivered again, later
            p.send_raw(
                "call_analyzed", call_id, orjson.dumps({"event": "call_analyzed", "call": p.sent.calls[call_id]})
            )
        p.flush()
        time.sleep(rng.uniform(0.5, 2.5))
        sink = sinks[name]
        assert sink.proc.poll() is None, sink.output()[-3000:]
        sink.proc.send_signal(signal.SIGKILL)
        sink.proc.wait()
        loaded_at_kill.append((sum(stored_offsets(catalog).values()), p.sent.deliveries))
        sinks[name] = start_service("sink", "sink", env={**env, "CALLSTREAM_LAKE_INSTANCE_ID": name})
        assert not reader.problems, "\n".join(reader.problems)
    assert len(p.sent.calls) == CALLS

    # The sinks that run now catch up; then they stop cleanly.
    total = sum(topic_counts(kafka_bootstrap, topics)[s] for s in ("call_analyzed", "chat_analyzed"))
    deadline = time.monotonic() + 240
    while sum(stored_offsets(catalog).values()) < total:
        assert time.monotonic() < deadline, f"the sinks did not catch up: {stored_offsets(catalog)} of {total}"
        for s in sinks.values():
            assert s.proc.poll() is None, s.output()[-3000:]
        time.sleep(0.5)
    reader.stop.set()
    reader.join()
    for s in sinks.values():
        assert s.stop() == 0, s.output()[-3000:]

    assert not reader.problems, "\n".join(reader.problems)
    assert len(reader.commits) >= 5, reader.commits  # the reader saw the lake change under it
    # Killed while the load was going on, not after it.
    assert sum(stored < sent for stored, sent in loaded_at_kill) >= KILLS_PER_SINK, loaded_at_kill
    assert not lake_problems(catalog, topic_log, tmp_path)
    lake = connect(catalog=catalog)
    counts = {t: lake.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("calls", "call_utterances", "chats")}
    lake.close()
    assert counts == {"calls": CALLS, "call_utterances": p.sent.total_utterances(), "chats": len(p.sent.chats)}
