"""The lake sink against the real broker, embedded flavour (SQLite catalog, local folder): the same
rows as the DuckDB sink, opt-outs scrubbed, redeliveries replacing rows, resuming from the lake."""

from __future__ import annotations

import duckdb
import orjson
import pytest

from tests.support.audit import TopicLog
from tests.support.lake import copy_to_duckdb, lake_problems, rows, stored_offsets
from warehouse.schema import TABLES

pytestmark = [pytest.mark.kafka]

# Columns that differ between two loads of the same records by design.
_LOAD_TIME = {"loaded_at"}


def _columns(table) -> list[str]:
    return [c for c in table.column_names if c not in _LOAD_TIME]


def test_the_lake_holds_the_same_rows_as_the_duckdb_warehouse(
    traffic, run_sink_once, run_lake_sink, embedded_lake, lake_catalog, warehouse_paths, topic_log, tmp_path
):
    p = traffic(seed=41, turns=(2, 6))
    p.send(300, duplicates=0.1)
    p.send(30, scenario="opt_out")
    p.send(40, scenario="chat")
    p.flush()
    run_sink_once()
    out = run_lake_sink(embedded_lake)
    assert " 0 dead letters" in out, out[-3000:]

    catalog = lake_catalog(embedded_lake)
    copy = tmp_path / "lake.duckdb"
    copy_to_duckdb(catalog, copy)
    db, _ = warehouse_paths
    for t in TABLES:
        want = rows(db, t.name, _columns(t), list(t.key))
        assert want, f"{t.name} is empty in DuckDB: the comparison would prove nothing"
        assert rows(copy, t.name, _columns(t), list(t.key)) == want, f"{t.name} differs from DuckDB"
    assert not lake_problems(catalog, topic_log, tmp_path)

    with duckdb.connect(str(copy), read_only=True) as con:
        opted = con.execute(
            "SELECT count(*), count(transcript), count(recording_url), count(call_summary), sum(utterance_count) "
            "FROM calls WHERE opted_out"
        ).fetchall()[0]
        assert opted[0] >= 30 and opted[1:] == (0, 0, 0, 0), opted
        assert con.execute(
            "SELECT count(*) FROM call_utterances JOIN calls USING (call_id) WHERE calls.opted_out"
        ).fetchall() == [(0,)]
        assert con.execute(
            "SELECT count(arguments), count(result) FROM call_tool_calls "
            "JOIN calls USING (call_id) WHERE calls.opted_out"
        ).fetchall() == [(0, 0)]


def test_a_redelivered_call_replaces_its_rows_and_the_sink_resumes_from_the_lake(
    traffic, run_lake_sink, embedded_lake, lake_catalog, topic_log, tmp_path
):
    p = traffic(seed=42, turns=(4, 8))
    ids = p.send(200, scenario="completed")
    p.flush()
    run_lake_sink(embedded_lake)
    catalog = lake_catalog(embedded_lake)
    first = stored_offsets(catalog)
    assert sum(first.values()) == 200

    # Re-analyzed calls with a shorter transcript: every table of the family must follow.
    changed = ids[:25]
    for call_id in changed:
        call = dict(p.sent.calls[call_id])
        call["transcript_object"] = call["transcript_object"][:2]
        call["transcript_with_tool_calls"] = []
        call["call_analysis"] = {**call.get("call_analysis", {}), "call_summary": "re-analyzed"}
        p.sent.calls[call_id] = call
        p.send_raw("call_analyzed", call_id, orjson.dumps({"event": "call_analyzed", "call": call}))
    p.send(50, scenario="completed")
    p.flush()
    # Another consumer group: the sink must resume from the lake's offsets, not from Kafka's.
    out = run_lake_sink(embedded_lake, CALLSTREAM_LAKE_GROUP_ID="another-group")
    assert "sink: 75 records" in out, out[-3000:]

    assert not lake_problems(catalog, topic_log, tmp_path)
    copy = tmp_path / "lake.duckdb"
    copy_to_duckdb(catalog, copy)
    with duckdb.connect(str(copy), read_only=True) as con:
        assert con.execute("SELECT count(*), count(DISTINCT call_id) FROM calls").fetchall() == [(250, 250)]
        summaries = dict(con.execute("SELECT call_id, call_summary FROM calls").fetchall())
        assert {summaries[c] for c in changed} == {"re-analyzed"}
        per_call = dict(con.execute("SELECT call_id, count(*) FROM call_utterances GROUP BY ALL").fetchall())
        assert {per_call.get(c) for c in changed} == {2}
        assert con.execute(
            "SELECT count(*) FROM call_tool_calls WHERE call_id IN (SELECT unnest(?))", [changed]
        ).fetchall() == [(0,)]
        total = con.execute("SELECT count(*) FROM call_utterances").fetchall()[0][0]
    assert total == p.sent.total_utterances()


def test_an_unloadable_record_goes_to_the_dead_letter_topic_and_its_offset_is_committed(
    traffic, run_lake_sink, embedded_lake, lake_catalog, kafka_bootstrap, topics
):
    p = traffic(seed=43)
    p.send(5)
    p.send_raw("call_analyzed", "broken", b'{"event": "call_analyzed", "call": {"call_id": 7}}')
    p.flush()
    out = run_lake_sink(embedded_lake)
    assert "1 dead letters" in out, out[-3000:]
    log = TopicLog(kafka_bootstrap, topics)
    try:
        log.read_until({})
        assert len(log.dead_letters) == 1 and "call_id" in log.dead_letters[0]
    finally:
        log.close()
    assert sum(stored_offsets(lake_catalog(embedded_lake)).values()) == 6


def test_the_lake_sink_applies_the_personal_data_settings_and_ends_past_transaction_markers(
    traffic, kafka_bootstrap, topics, run_lake_sink, embedded_lake, lake_catalog, tmp_path
):
    from confluent_kafka import Producer

    p = traffic(seed=44, turns=(2, 4))
    tx = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"test-lake-{topics}"})
    tx.init_transactions(30)
    sent = {}
    for _ in range(3):  # as `callstream replay` writes: each commit marker takes an offset
        ev = p.factory.events("completed")[-1]
        sent[ev.key] = ev.payload["call"]
        tx.begin_transaction()
        tx.produce(f"{topics}.call_analyzed", key=ev.key.encode(), value=ev.body())
        tx.commit_transaction(30)
    out = run_lake_sink(embedded_lake, CALLSTREAM_STORE_PHONE_NUMBERS="mask", CALLSTREAM_STORE_RECORDING_URLS="drop")
    assert "3 records" in out, out[-3000:]  # --until-caught-up ended, past the last marker
    copy = tmp_path / "lake.duckdb"
    copy_to_duckdb(lake_catalog(embedded_lake), copy)
    with duckdb.connect(str(copy), read_only=True) as con:
        stored = con.execute("SELECT call_id, from_number, to_number, recording_url, transcript FROM calls").fetchall()
    assert len(stored) == 3
    for call_id, from_n, to_n, url, transcript in stored:
        call = sent[call_id]
        assert from_n == "****" + call["from_number"][-4:] and to_n == "****" + call["to_number"][-4:]
        assert url is None and transcript == call["transcript"]  # transcripts are kept unless told
