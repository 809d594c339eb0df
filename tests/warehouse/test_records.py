"""Unit tests of body -> rows: what is kept, what an opted-out call loses, how drift and bad records go."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from callstream.fakecalls import CallFactory, Fleet
from warehouse.errors import RecordError
from warehouse.personal_data import KEEP_ALL, PersonalData, hash_number
from warehouse.records import FamilyBatch, Source
from warehouse.schema import CALL_FAMILY, CHAT_FAMILY, TABLES_BY_NAME


@pytest.fixture
def analyzed() -> Any:
    factory = CallFactory(Fleet(seed=5, agents=2), seed=5)

    def make(scenario: str = "completed", **overrides: Any) -> dict[str, Any]:
        return factory.events(scenario, **overrides)[-1].payload

    return make


def _load(
    *bodies: dict[str, Any], family: Any = CALL_FAMILY, personal: PersonalData = KEEP_ALL
) -> dict[str, list[dict[str, Any]]]:
    batch = FamilyBatch(family, personal)
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


KEY = b"records-test-key-0123456789"


def test_phone_numbers_are_kept_masked_or_hashed(analyzed):
    body = analyzed("completed", direction="inbound", from_number="+14155550123", to_number="+12125559876")
    as_sent = _load(body)["calls"][0]
    assert (as_sent["from_number"], as_sent["to_number"]) == ("+14155550123", "+12125559876")
    masked = _load(body, personal=PersonalData(phone_numbers="mask"))["calls"][0]
    assert (masked["from_number"], masked["to_number"]) == ("****0123", "****9876")
    hashed = _load(body, personal=PersonalData(phone_numbers="hash", key=KEY))["calls"][0]
    assert (
        hashed["from_number"] == hash_number("+1 415 555 0123", KEY) != hash_number("+14155550123", b"other key 123456")
    )
    assert len(hashed["to_number"]) == 64 and "9876" not in hashed["to_number"]
    # Only the numbers change.
    for row in (masked, hashed):
        assert {k: v for k, v in row.items() if not k.endswith("_number")} == {
            k: v for k, v in as_sent.items() if not k.endswith("_number")
        }
    web = analyzed("web_call")
    assert _load(web, personal=PersonalData(phone_numbers="hash", key=KEY))["calls"][0]["from_number"] is None


def test_dropped_transcripts_leave_no_conversation_text_but_keep_the_turns(analyzed):
    body = analyzed("completed")
    call = body["call"]
    call["transcript_with_tool_calls"].insert(1, {"role": "dtmf", "digit": "4111"})
    personal = PersonalData(transcripts=False)
    rows = _load(body, personal=personal)
    kept = _load(body)
    (row,) = rows["calls"]
    assert row["transcript"] is None and row["call_summary"] is None
    assert row["recording_url"] == call["recording_url"]  # a class of its own
    assert row["opted_out"] is False
    assert [(u["turn"], u["role"], u["start_s"]) for u in rows["call_utterances"]] == [
        (u["turn"], u["role"], u["start_s"]) for u in kept["call_utterances"]
    ]
    assert all(u["content"] is None and u["detail"] is None for u in rows["call_utterances"])
    assert rows["call_tool_calls"] and all(
        t["arguments"] is None and t["result"] is None for t in rows["call_tool_calls"]
    )
    assert [t["name"] for t in rows["call_tool_calls"]] == [t["name"] for t in kept["call_tool_calls"]]
    text = orjson.dumps(rows).decode()
    assert "4111" not in text
    for u in call["transcript_object"]:
        assert u["content"] not in text
    chat = analyzed("chat")
    chat_rows = _load(chat, family=CHAT_FAMILY, personal=personal)
    assert chat_rows["chats"][0]["transcript"] is None and chat_rows["chats"][0]["chat_summary"] is None
    assert len(chat_rows["chat_messages"]) == len(chat["chat"]["message_with_tool_calls"])
    assert all(m["content"] is None for m in chat_rows["chat_messages"])


def test_dropped_recording_urls(analyzed):
    body = analyzed("completed")
    (row,) = _load(body, personal=PersonalData(recording_urls=False))["calls"]
    assert row["recording_url"] is None and row["transcript"] == body["call"]["transcript"]


@pytest.mark.parametrize("personal", [KEEP_ALL, PersonalData(phone_numbers="mask")], ids=["keep", "mask"])
def test_an_opted_out_call_stays_scrubbed_whatever_the_settings(analyzed, personal):
    body = analyzed("opt_out")
    rows = _load(body, personal=personal)
    (row,) = rows["calls"]
    assert row["opted_out"] is True
    assert (row["transcript"], row["recording_url"], row["call_summary"]) == (None, None, None)
    assert rows["call_utterances"] == []


def test_a_forgotten_call_is_not_loaded(analyzed):
    gone, kept = analyzed("completed"), analyzed("completed")
    batch = FamilyBatch(CALL_FAMILY, forgotten=frozenset({gone["call"]["call_id"]}))
    for i, b in enumerate((gone, kept, gone)):
        batch.add(orjson.dumps(b), Source(partition=0, offset=i, received_at_ms=1_700_000_000_000, loaded_at_ms=1))
    assert [r["call_id"] for r in batch.tables()["calls"].to_pylist()] == [kept["call"]["call_id"]]
    assert batch.tables()["call_utterances"].column("call_id").unique().to_pylist() == [kept["call"]["call_id"]]
    assert batch.skipped_forgotten == 2


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
