"""The one definition of the event catalogue: event names, topics, keys and headers.

The gateway, the stream processors and the warehouse sink all import this module, so a new event
type or a renamed header is a change in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Subject(StrEnum):
    """What an event is about; it decides which object carries the message key."""

    CALL = "call"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class EventType:
    name: str
    subject: Subject
    description: str

    @property
    def key_field(self) -> str:
        """The id inside the subject object that keys the Kafka message."""
        return f"{self.subject.value}_id"


EVENTS: tuple[EventType, ...] = (
    EventType("call_started", Subject.CALL, "a call connected (never sent for a call that did not connect)"),
    EventType("call_ended", Subject.CALL, "a call completed, transferred or errored; no call_analysis"),
    EventType("call_analyzed", Subject.CALL, "post-call analysis is complete; the full call object"),
    EventType("transcript_updated", Subject.CALL, "turn-taking transcript update; repeats as it grows"),
    EventType("transfer_started", Subject.CALL, "a transfer was initiated"),
    EventType("transfer_bridged", Subject.CALL, "a transfer was bridged"),
    EventType("transfer_cancelled", Subject.CALL, "a transfer was cancelled or failed"),
    EventType("transfer_ended", Subject.CALL, "a transfer leg ended"),
    EventType("chat_started", Subject.CHAT, "a chat began"),
    EventType("chat_ended", Subject.CHAT, "a chat completed or errored; no chat_analysis"),
    EventType("chat_analyzed", Subject.CHAT, "chat analysis is complete"),
)

EVENTS_BY_NAME: dict[str, EventType] = {e.name: e for e in EVENTS}
EVENT_NAMES: tuple[str, ...] = tuple(e.name for e in EVENTS)
CALL_EVENT_NAMES: tuple[str, ...] = tuple(e.name for e in EVENTS if e.subject is Subject.CALL)
CHAT_EVENT_NAMES: tuple[str, ...] = tuple(e.name for e in EVENTS if e.subject is Subject.CHAT)

# Topic suffixes that are not event types.
UNKNOWN = "unknown"
DEAD_LETTER = "dead_letter"
ALERTS = "alerts"


class Header:
    """Kafka message header names (values are UTF-8 bytes)."""

    EVENT = "event"
    RECEIVED_AT = "received_at"  # unix ms at the gateway
    SIGNED_AT = "signed_at"  # unix ms from x-retell-signature's v=
    SOURCE_IP = "source_ip"
    REASON = "reason"  # dead letters only: why the body could not be routed


def topic(prefix: str, suffix: str) -> str:
    """`<prefix>.<suffix>`: the topic for an event name, or for unknown, dead_letter, alerts."""
    return f"{prefix}.{suffix}"


def event_topic(prefix: str, event: str) -> str:
    """The topic an event is published to: its own for a known type, `<prefix>.unknown` otherwise."""
    return topic(prefix, event if event in EVENTS_BY_NAME else UNKNOWN)


def all_topics(prefix: str) -> list[str]:
    """Every topic callstream uses under a prefix."""
    return [topic(prefix, s) for s in (*EVENT_NAMES, UNKNOWN, DEAD_LETTER, ALERTS)]


def key_field_for(event: str) -> str:
    """The id field that keys an event: `chat_id` for chat events, `call_id` for everything else."""
    et = EVENTS_BY_NAME.get(event)
    if et is not None:
        return et.key_field
    return "chat_id" if event.startswith("chat_") else "call_id"
