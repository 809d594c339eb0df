from __future__ import annotations

from kernel.catalogue import (
    EVENT_NAMES,
    EVENTS,
    Subject,
    all_topics,
    event_topic,
    subject_of,
)

SEED_EVENTS = {
    "call_started",
    "call_ended",
    "call_analyzed",
    "transcript_updated",
    "transfer_started",
    "transfer_bridged",
    "transfer_cancelled",
    "transfer_ended",
    "chat_started",
    "chat_ended",
    "chat_analyzed",
}


def test_catalogue_has_exactly_the_events_of_the_platform_pages():
    assert set(EVENT_NAMES) == SEED_EVENTS


def test_topics_follow_the_interface():
    assert event_topic("retell", "call_ended") == "retell.call_ended"
    assert event_topic("retell", "call_exploded") == "retell.unknown"
    assert set(all_topics("p")) == {f"p.{e}" for e in SEED_EVENTS} | {"p.unknown", "p.dead_letter", "p.alerts"}


def test_chat_events_are_about_chats_and_keyed_by_chat_id():
    assert subject_of("chat_ended") is Subject.CHAT
    assert subject_of("transfer_bridged") is Subject.CALL
    assert subject_of("chat_something_new") is None
    assert {e.key_field for e in EVENTS if e.subject is Subject.CHAT} == {"chat_id"}
    assert {e.key_field for e in EVENTS if e.subject is Subject.CALL} == {"call_id"}
