"""`callstream replay dead-letter|unknown` against the real broker: what routes now is written with the
gateway's key and headers, the rest stays, a second run writes nothing, a run killed halfway writes
nothing twice, and a record the sink keeps refusing does not go round for ever."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from callstream.replay import decide
from kernel.catalogue import Header
from tests.support.kafka import consume_all, topic_counts

P = "pfx"


def _body(event: str, call_id: str | None = None, **call: Any) -> bytes:
    if call_id is not None:
        call["call_id"] = call_id
    return orjson.dumps({"event": event, "call": call})


# -- deciding, without Kafka ----------------------------------------------------------------------


def test_a_body_that_routes_now_gets_the_gateways_key_and_headers_and_a_mark():
    headers = [
        (Header.EVENT, b""),
        (Header.REASON, b"event 'call_ended' has no call.call_id"),
        (Header.RECEIVED_AT, b"1700000000000"),
        (Header.SIGNED_AT, b"1700000000001"),
        (Header.SOURCE_IP, b"10.0.0.7"),
    ]
    d = decide(_body("call_ended", "c1"), headers, P, f"{P}.dead_letter", f"{P}.dead_letter[2]@41", 1)
    assert d.stays is None and d.route is not None
    assert (d.route.topic, d.route.key) == (f"{P}.call_ended", "c1")
    assert d.headers == [
        (Header.EVENT, b"call_ended"),
        (Header.RECEIVED_AT, b"1700000000000"),
        (Header.SIGNED_AT, b"1700000000001"),
        (Header.SOURCE_IP, b"10.0.0.7"),
        (Header.REPLAYED_FROM, f"{P}.dead_letter[2]@41".encode()),
    ]


def test_a_sink_dead_letter_goes_back_to_its_topic_without_its_dead_letter_headers():
    headers = [
        (Header.EVENT, b"call_analyzed"),
        (Header.REASON, b"$.call.start_timestamp: Expected int"),
        (Header.SOURCE_TOPIC, f"{P}.call_analyzed".encode()),
        ("source_partition", b"1"),
        ("source_offset", b"9"),
    ]
    d = decide(_body("call_analyzed", "c2"), headers, P, f"{P}.dead_letter", "w", 1_700_000_000_123)
    assert d.route is not None and d.route.topic == f"{P}.call_analyzed"
    # It had no received_at: when it was written to the dead-letter topic stands in.
    assert dict(d.headers) == {
        Header.EVENT: b"call_analyzed",
        Header.RECEIVED_AT: b"1700000000123",
        Header.REPLAYED_FROM: b"w",
    }


def test_what_does_not_route_or_routes_where_it_is_or_was_replayed_stays():
    dl, unknown = f"{P}.dead_letter", f"{P}.unknown"
    assert decide(b"{nope", [], P, dl, "w", 1).stays == "unroutable"
    assert decide(b"{nope", [], P, dl, "w", 1).reason == "body is not valid JSON"
    assert decide(_body("call_ended"), [], P, dl, "w", 1).stays == "unroutable"
    assert decide(_body("brand_new", "c3"), [], P, unknown, "w", 1).stays == "same topic"
    marked = [(Header.REPLAYED_FROM, b"x[0]@1")]
    assert decide(_body("call_analyzed", "c4"), marked, P, dl, "w", 1).stays == "replayed before"


# -- against the broker -------------------------------------------------------------------------------


def _cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "callstream", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})


@pytest.mark.kafka
def test_replay_dead_letter_writes_what_routes_once(kafka_bootstrap, topics, service_env, tmp_path):
    dl = f"{topics}.dead_letter"
    p = _producer(kafka_bootstrap)
    routable = {f"c{i}": _body("call_ended", f"c{i}", call_status="ended") for i in range(20)}
    for body in routable.values():  # as an older gateway, with a routing bug since fixed, dead-lettered them
        p.produce(
            dl, value=body, headers=[(Header.EVENT, b""), (Header.REASON, b"old bug"), (Header.RECEIVED_AT, b"7")]
        )
    p.produce(dl, value=b"{not json", headers=[(Header.EVENT, b""), (Header.REASON, b"not JSON")])
    p.produce(dl, value=_body("call_ended"), headers=[(Header.EVENT, b""), (Header.REASON, b"no id")])
    p.produce(dl, key=b"m1", value=_body("call_analyzed", "m1"), headers=[(Header.REPLAYED_FROM, b"x[0]@0")])
    assert p.flush(30) == 0

    first = _cli(service_env, tmp_path, "replay", "dead-letter", "--batch-size", "7", "--no-progress")
    assert f"read 23 events, wrote 20, 3 stay on {dl}" in first.stdout, first.stdout
    assert "2 still cannot be routed" in first.stdout and "1 were replayed once already" in first.stdout
    got = consume_all(kafka_bootstrap, f"{topics}.call_ended", expect=20)
    assert sorted((m.key().decode(), m.value()) for m in got) == sorted(routable.items())
    for m in got:
        h = dict(m.headers())
        assert h[Header.EVENT] == b"call_ended" and h[Header.RECEIVED_AT] == b"7"
        assert h[Header.REPLAYED_FROM].startswith(dl.encode()) and Header.REASON not in h

    second = _cli(service_env, tmp_path, "replay", "dead-letter", "--no-progress")
    assert "read 0 events, wrote 0" in second.stdout, second.stdout
    p.produce(dl, value=_body("call_ended", "late"), headers=[(Header.EVENT, b"")])
    assert p.flush(30) == 0
    third = _cli(service_env, tmp_path, "replay", "dead-letter", "--no-progress")
    assert "read 1 events, wrote 1" in third.stdout, third.stdout
    # Counted as records: transaction markers take offsets too.
    assert len(consume_all(kafka_bootstrap, f"{topics}.call_ended", expect=22, timeout=3)) == 21


@pytest.mark.kafka
def test_replay_unknown_routes_the_types_the_catalogue_knows_now(kafka_bootstrap, topics, service_env, tmp_path):
    p = _producer(kafka_bootstrap)
    # As a gateway whose catalogue did not know call_started yet put it there.
    p.produce(
        f"{topics}.unknown", key=b"c1", value=_body("call_started", "c1"), headers=[(Header.EVENT, b"call_started")]
    )
    p.produce(f"{topics}.unknown", key=b"c2", value=_body("hologram_started", "c2"), headers=[(Header.EVENT, b"x")])
    assert p.flush(30) == 0
    dry = _cli(service_env, tmp_path, "replay", "unknown", "--dry-run", "--no-progress")
    assert "would write 1" in dry.stdout, dry.stdout
    out = _cli(service_env, tmp_path, "replay", "unknown", "--no-progress")
    assert "wrote 1" in out.stdout and "1 route to the topic they are on" in out.stdout, out.stdout
    (m,) = consume_all(kafka_bootstrap, f"{topics}.call_started", expect=1)
    assert m.key() == b"c1" and dict(m.headers())[Header.EVENT] == b"call_started"
    assert topic_counts(kafka_bootstrap, topics)["unknown"] == 2  # nothing written back to where they were


def _committed(bootstrap: str, group: str, topic: str) -> int:
    """The group's committed offsets on `topic`, summed (0 while its coordinator is still being found)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in parts]
        return sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=10))
    except KafkaException as exc:
        if exc.args and exc.args[0].retriable():
            return 0
        raise
    finally:
        c.close()


@pytest.mark.kafka
def test_a_replay_killed_halfway_and_run_again_writes_every_event_once(kafka_bootstrap, topics, service_env, tmp_path):
    dl, n = f"{topics}.dead_letter", 4000
    p = _producer(kafka_bootstrap)
    for i in range(n):
        p.produce(dl, value=_body("call_ended", f"k{i}"), headers=[(Header.EVENT, b"")])
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "callstream", "replay", "dead-letter", "--batch-size", "10", "--no-progress"],
        env=service_env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    group = f"callstream-replay-{topics}-dead_letter"
    deadline = time.monotonic() + 180
    try:
        while _committed(kafka_bootstrap, group, dl) == 0:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the replay committed nothing"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # in the middle of a transaction or between two: both must be right
        proc.wait()
    halfway = _committed(kafka_bootstrap, group, dl)
    assert 0 < halfway < n, f"the replay was not stopped halfway ({halfway} of {n}); the test proves nothing"

    out = _cli(service_env, tmp_path, "replay", "dead-letter", "--no-progress")
    assert f"read {n - halfway} events, wrote {n - halfway}" in out.stdout, out.stdout
    got = consume_all(kafka_bootstrap, f"{topics}.call_ended", expect=n + 1, timeout=20)
    keys = [m.key() for m in got]
    assert len(keys) == n and len(set(keys)) == n


def _sink_once(env: dict[str, str], cwd: Path) -> str:
    return _cli(env, cwd, "sink", "--until-caught-up").stderr


@pytest.mark.kafka
def test_a_record_the_sink_cannot_load_goes_back_once_and_a_fixed_one_loads(
    kafka_bootstrap, topics, service_env, tmp_path
):
    p = _producer(kafka_bootstrap)
    bad = {"call_id": "bad1", "start_timestamp": "yesterday"}  # the sink's loader refuses this
    p.produce(f"{topics}.call_analyzed", key=b"bad1", value=orjson.dumps({"event": "call_analyzed", "call": bad}))
    # A body an older gateway dead-lettered by mistake: routable and loadable.
    good = {"call_id": "good1", "call_status": "ended", "start_timestamp": 1_790_000_000_000}
    p.produce(f"{topics}.dead_letter", value=orjson.dumps({"event": "call_analyzed", "call": good}))
    assert p.flush(30) == 0
    _sink_once(service_env, tmp_path)  # dead-letters bad1

    first = _cli(service_env, tmp_path, "replay", "dead-letter", "--no-progress")
    assert "wrote 2" in first.stdout and "1 of the events read were dead-lettered by the sink" in first.stdout
    _sink_once(service_env, tmp_path)  # loads good1, dead-letters bad1 again, with its replayed_from
    again = _cli(service_env, tmp_path, "replay", "dead-letter", "--no-progress")
    assert "read 1 events, wrote 0" in again.stdout and "1 were replayed once already" in again.stdout, again.stdout
    with duckdb.connect(service_env["CALLSTREAM_WAREHOUSE"], read_only=True) as con:
        assert con.execute("SELECT call_id FROM calls").fetchall() == [("good1",)]


@pytest.mark.kafka
def test_a_second_replay_of_the_same_topic_takes_over_and_nothing_is_written_twice(
    kafka_bootstrap, topics, service_env, tmp_path
):
    dl, n = f"{topics}.dead_letter", 4000
    p = _producer(kafka_bootstrap)
    for i in range(n):
        p.produce(dl, value=_body("call_ended", f"k{i}"), headers=[(Header.EVENT, b"")])
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    args = [sys.executable, "-m", "callstream", "replay", "dead-letter", "--batch-size", "5", "--no-progress"]
    first = subprocess.Popen(args, env=service_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    group = f"callstream-replay-{topics}-dead_letter"
    deadline = time.monotonic() + 180
    while _committed(kafka_bootstrap, group, dl) == 0:
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    second = _cli(service_env, tmp_path, "replay", "dead-letter", "--no-progress")
    _, err = first.communicate(timeout=60)
    assert first.returncode == 1, "the first run ended before the second started; the test proves nothing"
    assert "another `callstream replay`" in err.decode() and "took over" in err.decode()
    assert "wrote" in second.stdout
    keys = [m.key() for m in consume_all(kafka_bootstrap, f"{topics}.call_ended", expect=n + 1, timeout=20)]
    assert len(keys) == n and len(set(keys)) == n
