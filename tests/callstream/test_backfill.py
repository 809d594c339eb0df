"""`callstream backfill FILE...`: list-calls output (JSON arrays, JSON Lines, gzipped or not) read as a
stream, checked like a delivery, malformed records named by file and line; and 10,000 simulated
calls sent twice, over live traffic, counted by the worker and loaded by the sink exactly once."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from callstream import backfill
from callstream.backfill import BackfillError, Bad, Call, records, to_event
from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import free_port
from callstream.procs import Process
from kernel.catalogue import Header


def _calls(n: int, seed: int = 81, turns: tuple[int, int] = (2, 4)) -> list[dict[str, Any]]:
    """`n` analyzed call objects from the simulator (chats left out: list-calls lists calls)."""
    f = CallFactory(Fleet(seed=seed, agents=3), seed=seed, turns=turns)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        payload = f.events()[-1].payload
        if "call" in payload:
            out.append(payload["call"])
    return out


def _write(path: Path, calls: list[dict[str, Any]], kind: str) -> Path:
    if kind == "array":
        data = json.dumps(calls, indent=2, ensure_ascii=False).encode()
    elif kind == "compact":
        data = orjson.dumps(calls)
    else:
        data = b"".join(orjson.dumps(c) + b"\n" for c in calls)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _read(path: Path) -> list[Call | Bad]:
    return list(records(path))


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("calls.json", "array"),
        ("calls.json.gz", "array"),
        ("compact.json", "compact"),
        ("calls.jsonl", "lines"),
        ("calls.jsonl.gz", "lines"),
        ("gz-without-the-name", "lines"),
    ],
)
def test_arrays_and_json_lines_give_every_call_byte_for_byte(tmp_path, monkeypatch, name, kind):
    monkeypatch.setattr(backfill, "_CHUNK", 7)  # every record cut across reads, mid-string and mid-character
    calls = _calls(30)
    calls[3]["transcript"] = 'Agent: "quoted" ] , { } [ \\ — café 😀 ünïcödé'
    calls[4]["metadata"] = {"nested": [{"a": [1, 2, {"b": "]"}]}], "empty": {}}
    path = tmp_path / name
    if name == "gz-without-the-name":
        path.write_bytes(gzip.compress(b"".join(orjson.dumps(c) + b"\n" for c in calls)))
    else:
        _write(path, calls, kind)
    got = _read(path)
    assert all(isinstance(r, Call) for r in got)
    assert [orjson.loads(r.text) for r in got if isinstance(r, Call)] == calls


def test_the_line_of_each_record_is_where_it_starts(tmp_path):
    path = tmp_path / "calls.json"
    path.write_text('\n\n  [\n  {"call_id": "a"},\n\n  {"call_id":\n "b"}, {"call_id": "c"}\n]\n')
    assert [r.where for r in _read(path)] == [f"{path}:4", f"{path}:6", f"{path}:7"]
    lines = tmp_path / "calls.jsonl"
    lines.write_text('\n{"call_id": "a"}\n\n{"call_id": "b"}\n')
    assert [r.where for r in _read(lines)] == [f"{lines}:2", f"{lines}:4"]


def test_malformed_records_are_named_by_file_and_line(tmp_path):
    lines = tmp_path / "calls.jsonl"
    lines.write_text(
        '{"call_id": "a", "call_status": "ended"}\n'
        "{broken\n"
        '["not", "an object"]\n'
        '{"chat_id": "ch1"}\n'
        '{"call_id": 42}\n'
        '{"call_id": "b", "call_status": "ended"}\n'
    )
    got = [to_event(r, "p", 1) if isinstance(r, Call) else r for r in _read(lines)]
    bad = [(b.where.rsplit(":", 1)[1], b.reason) for b in got if isinstance(b, Bad)]
    assert [line for line, _ in bad] == ["2", "3", "4", "5"]
    assert "not valid JSON" in bad[0][1] and "not a call object" in bad[1][1]
    assert "has no call.call_id" in bad[2][1] and "call_id" in bad[3][1]
    assert [e.key for e in got if not isinstance(e, Bad) and e is not None] == ["a", "b"]

    array = tmp_path / "calls.json"
    array.write_text('[\n{"call_id": "a"},\n{"call_id": "b", "x": [1, 2}\n, {"call_id": "c"}]')
    got = _read(array)
    assert [r.text for r in got if isinstance(r, Call)] == [b'{"call_id": "a"}']
    (stop,) = [r for r in got if isinstance(r, Bad)]
    assert stop.where == f"{array}:3" and stop.rest_skipped and "not valid JSON" in stop.reason
    short = tmp_path / "short.json"
    short.write_text('[{"call_id": "a"}, {"call_id": "b"')
    *_, end = _read(short)
    assert isinstance(end, Bad) and "the file ends before its JSON array does" in end.reason


def test_a_damaged_file_is_an_error_that_names_it(tmp_path):
    whole = gzip.compress(b"".join(orjson.dumps(c) + b"\n" for c in _calls(200)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BackfillError, match=f"cannot read {cut} on: .*damaged or cut gzip"):
        _read(cut)
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"call_id": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(BackfillError, match="is not UTF-8 text"):
        _read(latin)


def test_an_event_is_the_webhook_body_with_the_gateways_headers():
    call = _calls(1)[0]
    text = orjson.dumps(call)
    ev = to_event(Call("f:1", text), "pfx", now_ms=1_800_000_000_000)
    assert not isinstance(ev, Bad) and ev is not None
    assert ev.key == call["call_id"]
    assert ev.body == b'{"event":"call_analyzed","call":' + text + b"}"
    assert orjson.loads(ev.body) == {"event": "call_analyzed", "call": call}
    assert dict(ev.headers) == {
        Header.EVENT: b"call_analyzed",
        Header.RECEIVED_AT: str(call["end_timestamp"]).encode(),
        Header.SIGNED_AT: str(call["end_timestamp"]).encode(),
        Header.BACKFILLED_AT: b"1800000000000",
    }
    for status in ("registered", "ongoing"):
        assert to_event(Call("f:1", orjson.dumps({**call, "call_status": status})), "pfx", 1) is None


@pytest.mark.parametrize(("name", "kind"), [("big.json", "array"), ("big.jsonl.gz", "lines")])
def test_a_big_file_is_streamed_not_loaded(tmp_path, monkeypatch, name, kind):
    monkeypatch.setattr(backfill, "_CHUNK", 64 * 1024)  # the same reading, at a scale a test affords
    path = _write(tmp_path / name, _calls(800, turns=(4, 8)), kind)
    whole = os.path.getsize(path) if kind == "array" else len(gzip.decompress(path.read_bytes()))
    assert whole > 12 * backfill._CHUNK
    read = [0]
    tracemalloc.start()
    try:
        stream = records(path, on_read=lambda n: read.__setitem__(0, read[0] + n))
        next(stream)
        assert read[0] <= 3 * backfill._CHUNK, "the first record came only after most of the file was read"
        n = 1 + sum(1 for _ in stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 800
    assert peak < whole / 4, f"reading took {peak:,} bytes of memory for a {whole:,}-byte file"


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callstream", "backfill", "--no-progress", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_dry_run_counts_and_strict_stops(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")}
    env["CALLSTREAM_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{free_port()}"  # a dry run needs no Kafka
    good = _write(tmp_path / "a.jsonl", [*_calls(5), {"call_id": "o1", "call_status": "ongoing"}], "lines")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"call_id": "x1", "call_status": "ended"}\n{nope\n{"call_id": "x2", "call_status": "ended"}\n')
    ok = _cli(["--dry-run", str(good)], env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "would send 5 calls from 1 files" in ok.stdout and "1 calls not ended" in ok.stdout
    skipped = _cli(["--dry-run", str(good), str(bad)], env, tmp_path)
    assert skipped.returncode == 1
    assert f"{bad}:2: not valid JSON" in skipped.stderr and "would send 7 calls" in skipped.stdout
    assert skipped.stderr.strip().splitlines()[-1] == "Error: 1 malformed records were skipped (listed above)"
    strict = _cli(["--dry-run", "--strict", str(bad), str(good)], env, tmp_path)
    assert strict.returncode == 1 and f"{bad}:2" in strict.stderr and "--strict" in strict.stderr
    assert "Traceback" not in skipped.stderr + strict.stderr


# -- 10,000 calls through the real pipeline ---------------------------------------------------------


def _lag(bootstrap: str, group: str, topic: str) -> int:
    """How far the group's committed offsets are behind the topic's end."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(topic, p) for p in c.list_topics(topic, timeout=10).topics[topic].partitions]
        committed = {tp.partition: tp.offset for tp in c.committed(parts, timeout=10)}
        return sum(c.get_watermark_offsets(tp, timeout=10)[1] - max(committed[tp.partition], 0) for tp in parts)
    finally:
        c.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_ten_thousand_calls_twice_over_live_traffic_are_counted_and_loaded_once(
    kafka_bootstrap, topics, service_env, start_service: Callable[..., Process], tmp_path
):
    calls = _calls(10_000, turns=(2, 3))
    ongoing = {**calls[0], "call_id": "still-ongoing", "call_status": "ongoing"}
    first = _write(tmp_path / "page1.json.gz", [*calls[:5000], ongoing], "array")
    second = _write(tmp_path / "page2.jsonl", calls[5000:], "lines")
    # Live traffic delivered some of the same calls already, as the gateway does.
    live = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for c in calls[4900:5100]:
        body = orjson.dumps({"event": "call_analyzed", "call": c})
        live.produce(
            f"{topics}.call_analyzed", key=c["call_id"].encode(), value=body, headers=[(Header.EVENT, b"call_analyzed")]
        )
    assert live.flush(30) == 0
    port = free_port()
    worker = start_service("worker", "worker", "--web-port", str(port), url=f"http://127.0.0.1:{port}")

    for _ in range(2):
        out = _cli([str(first), str(second)], service_env, tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "sent 10,000 calls from 2 files" in out.stdout and "acknowledged by Kafka: 10,000" in out.stdout
        assert "skipped 1 calls not ended yet and 0 malformed records" in out.stdout

    group = f"callstream-metrics-{topics}"
    deadline = time.monotonic() + 300
    while _lag(kafka_bootstrap, group, f"{topics}.call_analyzed") > 0:  # every copy processed, not only the first
        assert worker.alive() and time.monotonic() < deadline, worker.output()[-3000:]
        time.sleep(1)
    overall = httpx.get(f"{worker.url}/api/metrics", timeout=10).json()["overall"]
    assert (overall["calls"], overall["calls_analyzed"]) == (10_000, 10_000)

    sink = subprocess.run(
        [sys.executable, "-m", "callstream", "sink", "--until-caught-up"],
        env=service_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sink.returncode == 0, sink.stderr[-3000:]
    assert "20200 records" in sink.stderr, sink.stderr[-1000:]
    with duckdb.connect(service_env["CALLSTREAM_WAREHOUSE"], read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT call_id) FROM calls").fetchall() == [(10_000, 10_000)]
        assert con.execute("SELECT count(*) FROM calls WHERE call_id = 'still-ongoing'").fetchall() == [(0,)]
