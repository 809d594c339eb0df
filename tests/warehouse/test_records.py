"""Unit tests of body -> rows: what is kept, what an opted-out call loses, how drift and bad records go."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from callstream.fakecalls import CallFactory, Fleet
from warehouse.errors import RecordError
from warehouse.records import FamilyBatch, Source
from warehouse.schema import CALL_FAMILY, CHAT_FAMILY, TABLES_BY_NAME


@pytest.fixture
def analyzed() -> Any:
    factory = CallFactory(Fleet(seed=5, agents=2), seed=5)

    def make(scenario: str = "completed", **overrides: Any) -> dict[str, Any]:
        return factory.events(scenario, **overrides)[-1].payload

    return make


def _load(*bodies: dict[str, Any], family: Any = CALL_FAMILY) -> dict[str, list[dict[str, Any]]]:
    batch = FamilyBatch(family)
    for i, b in enumerate(bodies):
        batch.add(orjson.dumps(b), Source(partition=0, offset=i, received_at_ms=1_700_000_000_000, loaded_at_ms=1))
    return {name: t.to_pylist() for name, t in batch.tables().items()}


def test_call_becomes_one_row_with_utterances_and_tool_calls(analyzed):
    body = analyzed("completed")
    call = body["call"]
    rows = _load(body)
    (row,) = rows["calls"]
    assert row["call_id"] == call["call_id"]
    assert row["duration_ms"] == call["duration_ms"]
    assert row["combined_cost"] == call["call_cost"]["combined_cost"]
    assert row["e2e_latency_p50"] == call["latency"]["e2e"]["p50"]
    assert row["start_timestamp"].timestamp() * 1000 == pytest.approx(call["start_timestamp"])
    assert orjson.loads(row["metadata"]) == call["metadata"]
    assert orjson.loads(row["custom_analysis_data"]) == call["call_analysis"]["custom_analysis_data"]
    assert row["transcript"] == call["transcript"]
    utts = rows["call_utterances"]
    assert [u["content"] for u in utts] == [u["content"] for u in call["transcript_object"]]
    assert [u["turn"] for u in utts] == list(range(len(utts)))
    assert utts[0]["start_s"] == call["transcript_object"][0]["words"][0]["start"]
    invocations = [e for e in call["transcript_with_tool_calls"] if e["role"] == "tool_call_invocation"]
    results = {e["tool_call_id"]: e for e in call["transcript_with_tool_calls"] if e["role"] == "tool_call_result"}
    assert [(t["tool_call_id"], t["name"], t["arguments"]) for t in rows["call_tool_calls"]] == [
        (e["tool_call_id"], e["name"], e["arguments"]) for e in invocations
    ]
    for t in rows["call_tool_calls"]:
        assert (t["result"], t["successful"]) == (
            results[t["tool_call_id"]]["content"],
            results[t["tool_call_id"]]["successful"],
        )
    assert row["utterance_count"] == len(utts)


@pytest.mark.parametrize(
    "opt", [{"opt_out_sensitive_data_storage": True}, {"data_storage_setting": "basic_attributes_only"}]
)
def test_opted_out_call_keeps_no_sensitive_content(analyzed, opt):
    body = analyzed("completed", **opt)
    body["call"].update(opt)  # the analyzed object carries what the call was created with
    rows = _load(body)
    (row,) = rows["calls"]
    assert row["opted_out"] is True
    assert row["transcript"] is None and row["recording_url"] is None and row["call_summary"] is None
    assert rows["call_utterances"] == []
    for t in rows["call_tool_calls"]:
        assert t["arguments"] is None and t["result"] is None
    text = orjson.dumps(rows).decode()
    for u in body["call"]["transcript_object"]:
        assert u["content"] not in text


def test_new_fields_and_roles_do_not_stop_loading(analyzed):
    body = analyzed("completed")
    call = body["call"]
    call["brand_new_field"] = {"nested": [1, 2, 3]}
    call["call_analysis"]["new_score"] = 0.7
    call["transcript_with_tool_calls"].insert(1, {"role": "dtmf", "digit": "5"})
    call["transcript_with_tool_calls"].append({"role": "hologram", "content": "beam me up", "words": []})
    rows = _load(body)
    roles = [u["role"] for u in rows["call_utterances"]]
    assert roles[1] == "dtmf" and roles[-1] == "hologram"
    assert orjson.loads(rows["call_utterances"][1]["detail"]) == {"role": "dtmf", "digit": "5"}
    assert rows["call_utterances"][-1]["content"] == "beam me up"
    assert rows["calls"][0]["utterance_count"] == len(call["transcript_object"]) + 2


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("call"), "missing required field `call`"),
        (lambda b: b["call"].pop("call_id"), "call_id"),
        (lambda b: b["call"].__setitem__("duration_ms", "long"), "$.call.duration_ms"),
        (lambda b: b["call"]["call_analysis"].__setitem__("call_successful", "maybe"), "call_successful"),
        (lambda b: b["call"].__setitem__("transcript_with_tool_calls", [{"role": "tool_call_result"}]), "tool_call_id"),
    ],
)
def test_unloadable_record_is_an_error_that_names_the_field(analyzed, mutate, reason):
    body = analyzed("completed")
    mutate(body)
    with pytest.raises(RecordError, match=reason.replace("$", r"\$").replace("`", ".")):
        _load(body)


def test_repeated_delivery_in_one_batch_keeps_the_last(analyzed):
    body = analyzed("completed")
    later = copy.deepcopy(body)
    later["call"]["call_analysis"]["call_successful"] = False
    later["call"]["transcript_object"] = later["call"]["transcript_object"][:2]
    later["call"]["transcript_with_tool_calls"] = later["call"]["transcript_object"]
    rows = _load(body, later)
    assert [r["call_successful"] for r in rows["calls"]] == [False]
    assert len(rows["call_utterances"]) == 2


def test_chat_becomes_chat_and_messages():
    body = CallFactory(Fleet(seed=2), seed=2).events("chat")[-1].payload
    rows = _load(body, family=CHAT_FAMILY)
    (row,) = rows["chats"]
    chat = body["chat"]
    assert row["chat_id"] == chat["chat_id"]
    assert row["chat_successful"] == chat["chat_analysis"]["chat_successful"]
    assert [m["message_id"] for m in rows["chat_messages"]] == [
        m["message_id"] for m in chat["message_with_tool_calls"]
    ]
    assert row["message_count"] == len(chat["message_with_tool_calls"])


def test_arrow_tables_match_the_declared_schema(analyzed):
    batch = FamilyBatch(CALL_FAMILY)
    batch.add(orjson.dumps(analyzed("failed_dial")), Source(0, 0, None, 1_700_000_000_000))
    for name, t in batch.tables().items():
        assert t.schema == TABLES_BY_NAME[name].arrow_schema
