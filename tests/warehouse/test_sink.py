"""The sink against the real broker: every table once, Parquet equal to DuckDB, opt-out, drift, dead letters."""

from __future__ import annotations

import copy
import subprocess
import sys
import time

import duckdb
import orjson
import pytest

from tests.support.audit import assert_parquet_equals_duckdb
from warehouse.errors import WarehouseError
from warehouse.personal_data import hash_number
from warehouse.read import connect
from warehouse.schema import TABLES

pytestmark = [pytest.mark.kafka]


def test_every_table_once_and_parquet_equal_to_duckdb(traffic, run_sink_once, warehouse_paths):
    db, parquet = warehouse_paths
    p = traffic(seed=11, turns=(4, 8))
    p.send(120, duplicates=0.2)
    p.send(10, scenario="chat", duplicates=0.5)
    first = next(iter(p.sent.calls))  # delivered again at the end: replaced by a later batch of the same run
    p.send_raw("call_analyzed", first, orjson.dumps({"event": "call_analyzed", "call": p.sent.calls[first]}))
    p.flush()
    out = run_sink_once(CALLSTREAM_BATCH_MAX_RECORDS="40")
    # Every delivery read, none set aside: a short count below then points at the load itself.
    assert f"sink: {p.sent.deliveries} records" in out and " 0 dead letters" in out, out[-3000:]
    counts = assert_parquet_equals_duckdb(db, parquet)
    assert counts["calls"] == len(p.sent.calls), out[-3000:]
    assert counts["call_utterances"] == p.sent.total_utterances()
    assert counts["chats"] == len(p.sent.chats), out[-3000:]
    assert counts["chat_messages"] == sum(len(c["message_with_tool_calls"]) for c in p.sent.chats.values())

    # A call delivered again later, changed and on another day, replaces its row and its children
    # everywhere: its old day's files lose it.
    call_id, call = next((k, v) for k, v in p.sent.calls.items() if len(v.get("transcript_object") or []) > 2)
    moved = copy.deepcopy(call)
    moved["start_timestamp"] -= 3 * 86_400_000
    moved["end_timestamp"] -= 3 * 86_400_000
    moved["transcript_object"] = moved["transcript_object"][:2]
    moved["transcript_with_tool_calls"] = moved["transcript_object"]
    p.sent.calls[call_id] = moved
    p.send_raw("call_analyzed", call_id, orjson.dumps({"event": "call_analyzed", "call": moved}))
    p.flush()
    out = run_sink_once()
    # Its start checked the first run's loads, with the rows later batches replaced, against the load ledger.
    assert "load ledger" not in out, out[-3000:]
    counts = assert_parquet_equals_duckdb(db, parquet)
    assert counts["calls"] == len(p.sent.calls)
    assert counts["call_utterances"] == p.sent.total_utterances()
    reader = connect(parquet)
    assert reader.execute("SELECT DISTINCT day FROM call_utterances WHERE call_id = ?", [call_id]).fetchall() == [
        reader.execute("SELECT day FROM calls WHERE call_id = ?", [call_id]).fetchall()[0]
    ]
    assert reader.execute("SELECT count(*) FROM call_utterances WHERE call_id = ?", [call_id]).fetchall() == [(2,)]
    assert len(list((parquet / "calls").glob("day=*"))) == 2


def test_opted_out_calls_leave_no_sensitive_text_in_any_file(traffic, run_sink_once, warehouse_paths):
    db, parquet = warehouse_paths
    p = traffic(seed=12, turns=(4, 6))
    marker_kept = "KEEP-" + "x7Qp" * 6
    marker_out = "SECRET-" + "z9Wr" * 6
    kept = p.send(1, scenario="completed")[0]
    optouts = [
        *p.send(1, scenario="opt_out"),
        *p.send(1, scenario="completed", data_storage_setting="basic_attributes_only"),
    ]
    p.sent.calls.clear()
    for cid, marker in [(kept, marker_kept), *((o, marker_out) for o in optouts)]:
        # Re-send each call with a unique sentence in every place that holds conversation content.
        c = p.factory.events("completed")[-1].payload["call"]
        c["call_id"] = cid
        if cid in optouts:
            c["opt_out_sensitive_data_storage"] = cid == optouts[0]
            c["data_storage_setting"] = "basic_attributes_only" if cid == optouts[1] else "everything"
        c["transcript"] = f"Agent: {marker} transcript"
        c["transcript_object"][0]["content"] = f"{marker} utterance"
        c["transcript_with_tool_calls"] = [
            *c["transcript_object"],
            {
                "role": "tool_call_invocation",
                "tool_call_id": "t1",
                "name": "lookup",
                "arguments": f'{{"q": "{marker} args"}}',
            },
            {"role": "tool_call_result", "tool_call_id": "t1", "successful": True, "content": f"{marker} result"},
        ]
        c["recording_url"] = f"https://rec.example.com/{marker}.wav"
        c["call_analysis"]["call_summary"] = f"{marker} summary"
        p.sent.calls[cid] = c
        p.send_raw("call_analyzed", cid, orjson.dumps({"event": "call_analyzed", "call": c}))
    p.flush()
    run_sink_once(CALLSTREAM_PARQUET_COMPRESSION="uncompressed")
    with duckdb.connect(str(db)) as con:
        con.execute("CHECKPOINT")

    files = [db, *(f for f in parquet.rglob("*") if f.is_file())]
    raw = b"".join(f.read_bytes() for f in files)
    # The same search finds the kept call's text, so not finding the opted-out text means something.
    assert raw.count(marker_kept.encode()) >= 5
    assert marker_out.encode() not in raw
    reader = connect(parquet)
    for t in TABLES:
        text = orjson.dumps(reader.execute(f"SELECT * FROM {t.name}").fetchall(), default=str).decode()
        assert marker_out not in text, t.name
    assert reader.execute("SELECT count(*) FROM calls WHERE opted_out").fetchall() == [(2,)]
    assert reader.execute(
        "SELECT count(*) FROM call_tool_calls WHERE call_id IN (?, ?) AND name = 'lookup'", optouts
    ).fetchall() == [(2,)]
    assert reader.execute("SELECT count(*) FROM call_utterances WHERE call_id IN (?, ?)", optouts).fetchall() == [(0,)]


def test_drift_loads_and_unloadable_records_go_to_dead_letter(traffic, run_sink_once, warehouse_paths, consume, topics):
    db, _ = warehouse_paths
    p = traffic(seed=13, turns=(3, 5))
    good = p.factory.events("completed")[-1].payload
    good["call"]["a_field_from_next_year"] = {"x": 1}
    good["call"]["transcript_with_tool_calls"].append({"role": "node_transition", "new_node_id": "n2"})
    p.send_raw("call_analyzed", good["call"]["call_id"], orjson.dumps(good))
    bad_type = p.factory.events("completed")[-1].payload
    bad_type["call"]["start_timestamp"] = "yesterday"
    p.send_raw("call_analyzed", bad_type["call"]["call_id"], orjson.dumps(bad_type))
    p.send_raw("call_analyzed", "nope", b"{not json")
    p.send_raw("chat_analyzed", "nochat", b'{"event": "chat_analyzed"}')
    after = p.send(3)
    p.flush()
    run_sink_once()

    dead = consume(f"{topics}.dead_letter", expect=3)
    reasons = {m.key(): dict(m.headers())["reason"].decode() for m in dead}
    assert set(reasons) == {bad_type["call"]["call_id"].encode(), b"nope", b"nochat"}
    assert "$.call.start_timestamp" in reasons[bad_type["call"]["call_id"].encode()]
    assert "chat" in reasons[b"nochat"]
    assert {m.value() for m in dead} >= {b"{not json"}
    with duckdb.connect(str(db), read_only=True) as con:
        ids = {r[0] for r in con.execute("SELECT call_id FROM calls").fetchall()}
        assert ids == {good["call"]["call_id"], *after}
        roles = con.execute(
            "SELECT role FROM call_utterances WHERE call_id = ? ORDER BY turn", [good["call"]["call_id"]]
        ).fetchall()
        assert roles[-1] == ("node_transition",)


@pytest.mark.slow
def test_a_call_is_readable_while_the_sink_runs(traffic, start_service, sink_env, warehouse_paths):
    _, parquet = warehouse_paths
    sink = start_service("sink", "sink", env=sink_env)
    p = traffic(seed=14, turns=(3, 5))
    (cid,) = p.send(1)
    p.flush()
    deadline = time.monotonic() + 60
    seen = None
    while time.monotonic() < deadline and seen is None:
        assert sink.proc.poll() is None, sink.output()[-3000:]
        try:
            seen = connect(parquet).execute("SELECT call_id, utterance_count FROM calls").fetchall()[0]
        except (WarehouseError, IndexError):  # no snapshot published yet, or not with the call yet
            seen = None
        time.sleep(0.2)
    assert seen == (cid, p.sent.utterances(cid))
    assert sink.stop() == 0, sink.output()[-3000:]


def test_a_batch_the_writer_cannot_commit_stops_the_sink_and_stores_nothing(
    traffic, service_env, sink_env, warehouse_paths, tmp_path
):
    # The writer thread commits while the consuming thread decodes ahead: its failure must end the
    # process with the reason, not leave it waiting, and its transaction must leave nothing behind.
    db, _ = warehouse_paths
    with duckdb.connect(str(db)) as con:  # a file whose call_utterances predates the `detail` column
        con.execute(
            "CREATE TABLE call_utterances (call_id VARCHAR NOT NULL, turn INTEGER NOT NULL, role VARCHAR, "
            "content VARCHAR, start_s DOUBLE, end_s DOUBLE, day DATE NOT NULL, _load_seq BIGINT NOT NULL)"
        )
    p = traffic(seed=15, turns=(3, 5))
    p.send(50, scenario="completed")
    p.flush()
    proc = subprocess.run(
        [sys.executable, "-m", "callstream", "sink", "--until-caught-up"],
        env={**service_env, **sink_env},
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
    )
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, out[-3000:]
    assert f"writing to {db} failed" in out and "call_utterances" in out, out[-3000:]
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls").fetchall() == [(0,)]
        assert con.execute("SELECT count(*) FROM _callstream_offsets").fetchall() == [(0,)]


def test_a_load_found_short_at_a_restart_is_loaded_again_from_kafka(traffic, run_sink_once, warehouse_paths):
    # What DuckDB's WAL replay once gave after a crash: a committed load with one chat row missing,
    # its messages all there, and the offsets past it. The next start must notice and reload it.
    db, parquet = warehouse_paths
    p = traffic(seed=16, turns=(3, 6))
    p.send(30)
    p.send(12, scenario="chat")
    p.flush()
    run_sink_once()
    with duckdb.connect(str(db)) as con:
        (chat_id,) = con.execute("SELECT chat_id FROM chats ORDER BY kafka_offset LIMIT 1").fetchone()
        con.execute("DELETE FROM chats WHERE chat_id = ?", [chat_id])
    out = run_sink_once()
    assert "differ from the load ledger" in out and "chats" in out, out[-3000:]
    counts = assert_parquet_equals_duckdb(db, parquet)
    assert counts["chats"] == len(p.sent.chats)
    assert counts["chat_messages"] == sum(len(c["message_with_tool_calls"]) for c in p.sent.chats.values())
    assert counts["calls"] == len(p.sent.calls)
    assert counts["call_utterances"] == p.sent.total_utterances()
    out = run_sink_once()  # and the start after that finds the warehouse whole
    assert "load ledger" not in out, out[-3000:]


def test_personal_data_settings_reach_duckdb_and_every_parquet_file(traffic, run_sink_once, warehouse_paths):
    db, parquet = warehouse_paths
    key = "sink-test-key-0123456789"
    p = traffic(seed=16, turns=(3, 5))
    p.send(40, scenario="completed")
    p.send(5, scenario="opt_out")
    p.send(5, scenario="chat")
    p.flush()
    run_sink_once(
        CALLSTREAM_STORE_PHONE_NUMBERS="hash",
        CALLSTREAM_PHONE_HASH_KEY=key,
        CALLSTREAM_STORE_TRANSCRIPTS="drop",
        CALLSTREAM_STORE_RECORDING_URLS="drop",
        CALLSTREAM_PARQUET_COMPRESSION="uncompressed",
    )
    numbers = {c[k] for c in p.sent.calls.values() for k in ("from_number", "to_number") if c.get(k)}
    texts = {u["content"] for c in p.sent.calls.values() for u in c["transcript_object"]}
    urls = {c["recording_url"] for c in p.sent.calls.values() if c.get("recording_url")}
    assert numbers and texts and urls
    files = b"".join(f.read_bytes() for f in parquet.rglob("*.parquet"))
    assert any(cid.encode() in files for cid in p.sent.calls), "uncompressed Parquet should show the call ids"
    for secret in (*numbers, *texts, *urls):
        assert secret.encode() not in files, secret
    for reader in (duckdb.connect(str(db), read_only=True), connect(parquet)):
        rows = reader.execute("SELECT call_id, from_number, to_number, transcript, recording_url FROM calls").fetchall()
        assert len(rows) == len(p.sent.calls)
        for call_id, from_n, to_n, transcript, url in rows:
            sent = p.sent.calls[call_id]
            assert from_n == (hash_number(sent["from_number"], key.encode()) if sent.get("from_number") else None)
            assert to_n == (hash_number(sent["to_number"], key.encode()) if sent.get("to_number") else None)
            assert transcript is None and url is None
        assert reader.execute("SELECT count(content) FROM call_utterances").fetchall() == [(0,)]
        assert reader.execute("SELECT count(*) FROM call_utterances").fetchall() == [(p.sent.total_utterances(),)]
        # Analysts still count callers: a hash stands for one number.
        callers = {
            (c["to_number"] if c.get("direction") == "outbound" else c.get("from_number"))
            for c in p.sent.calls.values()
        }
        assert reader.execute("SELECT sum(callers) FROM daily_callers").fetchall() == [(len(callers - {None}),)]
        reader.close()


def _transactional(bootstrap: str, topic_name: str, bodies: list[tuple[str, bytes]]) -> None:
    """Each body in its own transaction, as `callstream replay` writes: every commit marker takes an offset."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"test-{topic_name}"})
    p.init_transactions(30)
    for key, body in bodies:
        p.begin_transaction()
        p.produce(topic_name, key=key.encode(), value=body)
        p.commit_transaction(30)


def test_until_caught_up_ends_on_topics_a_transactional_producer_wrote(
    traffic, kafka_bootstrap, topics, service_env, sink_env, warehouse_paths, tmp_path
):
    db, _ = warehouse_paths
    calls = traffic(seed=17, turns=(2, 3)).factory
    bodies = [(ev.key, ev.body()) for ev in (calls.events("completed")[-1] for _ in range(4))]
    _transactional(kafka_bootstrap, f"{topics}.call_analyzed", bodies)
    proc = subprocess.run(
        [sys.executable, "-m", "callstream", "sink", "--until-caught-up"],
        env={**service_env, **sink_env},
        cwd=tmp_path,
        capture_output=True,
        timeout=120,  # it waited for ever for offsets that only markers hold
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls").fetchall() == [(4,)]
