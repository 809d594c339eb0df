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


class EventName(StrEnum):
    """Every event type the platforms send: code names events by these members, never by strings."""

    CALL_STARTED = "call_started"
    CALL_ENDED = "call_ended"
    CALL_ANALYZED = "call_analyzed"
    TRANSCRIPT_UPDATED = "transcript_updated"
    TRANSFER_STARTED = "transfer_started"
    TRANSFER_BRIDGED = "transfer_bridged"
    TRANSFER_CANCELLED = "transfer_cancelled"
    TRANSFER_ENDED = "transfer_ended"
    CHAT_STARTED = "chat_started"
    CHAT_ENDED = "chat_ended"
    CHAT_ANALYZED = "chat_analyzed"


@dataclass(frozen=True, slots=True)
class EventType:
    name: EventName
    subject: Subject
    description: str

    @property
    def key_field(self) -> str:
        """The id inside the subject object that keys the Kafka message."""
        return f"{self.subject.value}_id"


E = EventName
EVENTS: tuple[EventType, ...] = (
    EventType(E.CALL_STARTED, Subject.CALL, "a call connected (never sent for a call that did not connect)"),
    EventType(E.CALL_ENDED, Subject.CALL, "a call completed, transferred or errored; no call_analysis"),
    EventType(E.CALL_ANALYZED, Subject.CALL, "post-call analysis is complete; the full call object"),
    EventType(E.TRANSCRIPT_UPDATED, Subject.CALL, "turn-taking transcript update; repeats as it grows"),
    EventType(E.TRANSFER_STARTED, Subject.CALL, "a transfer was initiated"),
    EventType(E.TRANSFER_BRIDGED, Subject.CALL, "a transfer was bridged"),
    EventType(E.TRANSFER_CANCELLED, Subject.CALL, "a transfer was cancelled or failed"),
    EventType(E.TRANSFER_ENDED, Subject.CALL, "a transfer leg ended"),
    EventType(E.CHAT_STARTED, Subject.CHAT, "a chat began"),
    EventType(E.CHAT_ENDED, Subject.CHAT, "a chat completed or errored; no chat_analysis"),
    EventType(E.CHAT_ANALYZED, Subject.CHAT, "chat analysis is complete; the full chat object"),
)
del E

EVENTS_BY_NAME: dict[str, EventType] = {e.name.value: e for e in EVENTS}
EVENT_NAMES: tuple[str, ...] = tuple(e.name.value for e in EVENTS)
# The event that carries a subject's complete object, after analysis: what the warehouse loads.
ANALYZED: dict[Subject, EventName] = {Subject.CALL: EventName.CALL_ANALYZED, Subject.CHAT: EventName.CHAT_ANALYZED}


def subject_of(event: str) -> Subject | None:
    """Whether a known event is about a call or a chat; None for a type the catalogue does not know."""
    et = EVENTS_BY_NAME.get(event)
    return et.subject if et is not None else None


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
    SOURCE_TOPIC = "source_topic"  # dead letters of a sink only: the topic the record came from
    REPLAYED_FROM = "replayed_from"  # `callstream replay`: `<topic>[<partition>]@<offset>` it was routed from
    BACKFILLED_AT = "backfilled_at"  # `callstream backfill`: unix ms of the run that wrote it


def topic(prefix: str, suffix: str) -> str:
    """`<prefix>.<suffix>`: the topic for an event name, or for unknown, dead_letter, alerts."""
    return f"{prefix}.{suffix}"


def event_topic(prefix: str, event: str) -> str:
    """The topic an event is published to: its own for a known type, `<prefix>.unknown` otherwise."""
    return topic(prefix, event if event in EVENTS_BY_NAME else UNKNOWN)


def all_topics(prefix: str) -> list[str]:
    """Every topic callstream uses under a prefix."""
    return [topic(prefix, s) for s in (*EVENT_NAMES, UNKNOWN, DEAD_LETTER, ALERTS)]
