from __future__ import annotations

from kernel.catalogue import (
    EVENT_NAMES,
    all_topics,
    event_topic,
    key_field_for,
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


def test_chat_events_are_keyed_by_chat_id():
    assert key_field_for("chat_ended") == "chat_id"
    assert key_field_for("transfer_bridged") == "call_id"
    assert key_field_for("chat_something_new") == "chat_id"
