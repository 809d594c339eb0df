"""Per-call rules that come from the catalogue rather than from lists kept by hand."""

from __future__ import annotations

from kernel.catalogue import EventName
from streams.alertrules import load_config
from streams.calls import Body, SubjectFields, apply_event, counter_of

E = EventName


def test_every_lifecycle_event_counts_into_its_plural() -> None:
    assert {e: counter_of(e) for e in EventName if e is not E.TRANSCRIPT_UPDATED} == {
        E.CALL_STARTED: "calls_started",
        E.CALL_ENDED: "calls_ended",
        E.CALL_ANALYZED: "calls_analyzed",
        E.TRANSFER_STARTED: "transfers_started",
        E.TRANSFER_BRIDGED: "transfers_bridged",
        E.TRANSFER_CANCELLED: "transfers_cancelled",
        E.TRANSFER_ENDED: "transfers_ended",
        E.CHAT_STARTED: "chats_started",
        E.CHAT_ENDED: "chats_ended",
        E.CHAT_ANALYZED: "chats_analyzed",
    }


def test_the_catalogue_says_whether_an_event_is_about_a_chat() -> None:
    body = Body(event="chat_started", chat=SubjectFields(chat_id="c1", agent_id="a1"))
    state, effects, _ = apply_event(None, E.CHAT_STARTED, body, load_config())
    assert state.agent == "a1"
    assert effects.counts == {"chats": 1, "event:chat_started": 1, "chats_started": 1}


def test_an_unknown_event_type_is_counted_under_its_name_and_nothing_else() -> None:
    body = Body(event="chat_reopened", chat=SubjectFields(chat_id="c1", agent_id="a1"))
    state, effects, raised = apply_event(None, "chat_reopened", body, load_config())
    assert effects.counts == {"chats": 1, "event:chat_reopened": 1}
    assert state.seen == 0 and raised == []
