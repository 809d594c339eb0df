"""What a prefix's topics hold, read once to their end, and what that owes: the worker's exact totals,
the per-call alerts, the warehouse's rows and child rows; and which acknowledged events are not there.

The worker's rules for the sender's habits (streams/calls.py), restated here on their own: each
lifecycle event counts once per call; a `transcript_updated` counts when its transcript is longer
than every earlier one of the call (in partition order: a repeat or a reordered older snapshot does
not); every call and chat counts once. The per-call alerts of the rules in force (the shipped ones
unless a config is given), each once: `failed_dial` for a call that did not connect, `error` for a
connected call that ended on an error, `unsuccessful` for a connected call analyzed unsuccessful
(not in voicemail), `negative_sentiment`, `transfer_cancelled`. The warehouse holds one row per
analyzed call and chat, from its last delivery, with that delivery's utterances, tool calls and
chat messages (none of the text for a call that opted out of storage).

Each message is looked at once and kept small (hashes and counts; the analyzed topics' keys by
offset, for the warehouse audit), so an hour at 500 events/s fits in a few hundred MB.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
from confluent_kafka import Consumer, Message, TopicPartition

from kernel.catalogue import ALERTS, DEAD_LETTER, EventName, Subject, subject_of, topic
from streams.alertrules import AlertConfig, load_config

TOOL_ROLES = frozenset({"tool_call_invocation", "tool_call_result"})
Partition = tuple[str, int]


class _Entry(msgspec.Struct):
    role: str = ""
    tool_call_id: str | None = None


class _Analysis(msgspec.Struct):
    call_successful: bool | None = None
    user_sentiment: str | None = None
    in_voicemail: bool | None = None


class _Call(msgspec.Struct):
    call_id: str = ""
    call_status: str | None = None
    disconnection_reason: str | None = None
    transcript: str | None = None
    call_analysis: _Analysis | None = None
    transcript_object: list[_Entry] | None = None
    transcript_with_tool_calls: list[_Entry] | None = None
    opt_out_sensitive_data_storage: bool | None = None
    data_storage_setting: str | None = None


class _Chat(msgspec.Struct):
    chat_id: str = ""
    message_with_tool_calls: list[_Entry] | None = None
    opt_out_sensitive_data_storage: bool | None = None
    data_storage_setting: str | None = None


class _Body(msgspec.Struct):
    call: _Call | None = None
    chat: _Chat | None = None


_decode = msgspec.json.Decoder(_Body).decode


def digest_of(body: bytes) -> int:
    """The acknowledgement record's digest of a body (`callstream.sim.record.body_digest`), as an int."""
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "big")


def _opted_out(opt_out: bool | None, storage: str | None) -> bool:
    return bool(opt_out) or storage == "basic_attributes_only"


@dataclass
class Children:
    """The child rows a call's or chat's last analyzed delivery makes."""

    utterances: int = 0
    tool_calls: int = 0
    messages: int = 0


def call_children(c: _Call) -> Children:
    entries = c.transcript_with_tool_calls or c.transcript_object or []
    out = _opted_out(c.opt_out_sensitive_data_storage, c.data_storage_setting)
    tools = {e.tool_call_id for e in entries if e.role in TOOL_ROLES}
    utterances = 0 if out else sum(1 for e in entries if e.role not in TOOL_ROLES)
    return Children(utterances=utterances, tool_calls=len(tools))


@dataclass
class Stored:
    """What the topics held, and what it owes."""

    rules: AlertConfig = field(default_factory=load_config)
    lifecycle: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # event -> key hashes
    transcript_news: int = 0
    calls: set[int] = field(default_factory=set)
    chats: set[int] = field(default_factory=set)
    owed_alerts: set[str] = field(default_factory=set)  # per-call alert ids the stored events owe
    analyzed_keys: dict[Partition, list[str]] = field(default_factory=lambda: defaultdict(list))
    children: dict[str, Children] = field(default_factory=dict)  # key -> its last analyzed delivery's
    by_topic: Counter[str] = field(default_factory=Counter)  # messages per topic suffix
    dead_letters: int = 0
    ends: dict[Partition, int] = field(default_factory=dict)
    _longest: dict[int, int] = field(default_factory=dict)

    # -- what it owes ---------------------------------------------------------------------------

    def worker_counts(self) -> dict[str, int]:
        """What the worker's `/api/counts` must say under `events`."""
        counts = {e: len(keys) for e, keys in self.lifecycle.items() if keys}
        if self.transcript_news:
            counts[EventName.TRANSCRIPT_UPDATED.value] = self.transcript_news
        return counts

    def child_rows(self) -> Children:
        total = Children()
        for c in self.children.values():
            total.utterances += c.utterances
            total.tool_calls += c.tool_calls
            total.messages += c.messages
        return total

    def last_deliveries(self, suffix: str, offsets: dict[Partition, int]) -> dict[tuple[int, str], int]:
        """(partition, key) -> the offset of the key's last delivery below the stored offset (as
        `tests.support.audit.TopicLog.last_deliveries`)."""
        want: dict[tuple[int, str], int] = {}
        for (t, p), next_offset in offsets.items():
            if t.endswith("." + suffix):
                for o, key in enumerate(self.analyzed_keys.get((t, p), [])[:next_offset]):
                    want[(p, key)] = o
        return want

    # -- taking each message in -----------------------------------------------------------------

    def add_event(self, event: str, partition: Partition, offset: int, key: str, body: bytes) -> None:
        self.by_topic[event] += 1
        h = hash(key)
        (self.chats if subject_of(event) is Subject.CHAT else self.calls).add(h)
        if event == EventName.TRANSCRIPT_UPDATED:
            call = _decode(body).call
            length = len(call.transcript or "") if call else 0
            if length > self._longest.get(h, -1):
                self._longest[h] = length
                self.transcript_news += 1
            return
        self.lifecycle[event].add(h)
        if event in (EventName.CALL_ANALYZED, EventName.CHAT_ANALYZED):
            keys = self.analyzed_keys[partition]
            assert offset == len(keys), f"{partition}: offset {offset} after {len(keys)} messages"
            keys.append(key)
        if event == EventName.TRANSFER_CANCELLED:
            self._owe("transfer_cancelled", key)
        elif event in (EventName.CALL_ENDED, EventName.CALL_ANALYZED):
            self._call_outcome(event, key, body)
        elif event == EventName.CHAT_ANALYZED:
            chat = _decode(body).chat or _Chat()
            out = _opted_out(chat.opt_out_sensitive_data_storage, chat.data_storage_setting)
            self.children[key] = Children(messages=0 if out else len(chat.message_with_tool_calls or []))

    def _owe(self, rule: str, key: str) -> None:
        if self.rules.enabled(rule):
            self.owed_alerts.add(f"{rule}:{key}")

    def _call_outcome(self, event: str, key: str, body: bytes) -> None:
        call = _decode(body).call or _Call()
        reason = call.disconnection_reason or "unknown"
        not_connected = self.rules.is_failed_dial(reason) or call.call_status == "not_connected"
        if not_connected:
            self._owe("failed_dial", key)
        elif self.rules.is_error(reason):
            self._owe("error", key)
        if event != EventName.CALL_ANALYZED:
            return
        self.children[key] = call_children(call)
        analysis = call.call_analysis or _Analysis()
        voicemail = bool(analysis.in_voicemail) and self.rules.unsuccessful.ignore_voicemail
        if analysis.call_successful is False and not not_connected and not voicemail:
            self._owe("unsuccessful", key)
        if analysis.user_sentiment and analysis.user_sentiment in self.rules.negative_sentiment.sentiments:
            self._owe("negative_sentiment", key)


def _read_to_end(
    bootstrap: str, names: list[str], take: Callable[[Partition, int, Message], None], timeout: float
) -> dict[Partition, int]:
    """Hand every message of `names` below the end offsets of now to `take`; return those end offsets."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"audit-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        meta = c.list_topics(timeout=30)
        ends = {}
        for name in names:
            if name in meta.topics and meta.topics[name].error is None:
                for p in meta.topics[name].partitions:
                    ends[(name, p)] = c.get_watermark_offsets(TopicPartition(name, p), timeout=30)[1]
        todo = {tp: end for tp, end in ends.items() if end > 0}
        c.assign([TopicPartition(t, p, 0) for t, p in todo])
        deadline = time.monotonic() + timeout
        while todo:
            assert time.monotonic() < deadline, f"the topics did not read back to their end in {timeout:.0f}s: {todo}"
            for m in c.consume(1000, timeout=0.5):
                if m.error() is not None:
                    continue
                tp, offset = (str(m.topic()), int(m.partition() or 0)), int(m.offset() or 0)
                if tp not in todo or offset >= ends[tp]:
                    continue
                if offset + 1 >= todo[tp]:
                    del todo[tp]
                take(tp, offset, m)
    finally:
        c.close()
    return ends


def read_stored(
    bootstrap: str, prefix: str, acked: set[int] | None = None, rules: AlertConfig | None = None, timeout: float = 900
) -> Stored:
    """Every message of the prefix's event and dead-letter topics up to their end offsets of now.

    Each message's digest is taken out of `acked` (when given): what is left was acknowledged and
    is not on a topic.
    """
    events = {topic(prefix, e): e.value for e in EventName}
    out = Stored(rules=rules or load_config())

    def take(tp: Partition, offset: int, m: Message) -> None:
        value = m.value() or b""
        if tp[0] not in events:
            out.dead_letters += 1
            return
        out.add_event(events[tp[0]], tp, offset, (m.key() or b"").decode(), value)
        if acked is not None:
            acked.discard(digest_of(value))

    out.ends = _read_to_end(bootstrap, [*events, topic(prefix, DEAD_LETTER)], take, timeout)
    return out


@dataclass
class AlertLog:
    """The alerts topic: how often each alert id is on it, and the failure-rate alerts."""

    ids: Counter[str] = field(default_factory=Counter)
    per_call: set[str] = field(default_factory=set)
    rate: list[tuple[str, int]] = field(default_factory=list)  # (agent, at ms)

    def add(self, body: bytes) -> None:
        alert = msgspec.json.decode(body)
        self.ids[str(alert.get("id"))] += 1
        if alert.get("call_id"):
            self.per_call.add(str(alert["id"]))
        else:
            self.rate.append((str(alert.get("agent_id")), int(alert.get("at") or 0)))


def read_alerts(bootstrap: str, prefix: str, timeout: float = 300) -> AlertLog:
    out = AlertLog()
    _read_to_end(bootstrap, [topic(prefix, ALERTS)], lambda tp, offset, m: out.add(m.value() or b""), timeout)
    return out
