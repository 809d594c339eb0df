"""From webhook bodies to warehouse rows, built as Arrow columns.

Bodies are decoded with msgspec into structs that name only the fields we keep: unknown fields are
skipped (a new field in the call object never stops loading), free-form objects stay raw JSON text
(`msgspec.Raw`, so metadata is stored byte for byte), and a known field of the wrong type is an error
that names its JSON path (the record goes to the dead-letter topic with that reason).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pyarrow as pa

from warehouse.errors import RecordError
from warehouse.schema import (
    CALL_TOOL_CALLS,
    CALL_UTTERANCES,
    CALLS,
    CHAT_MESSAGES,
    CHATS,
    Family,
    Table,
)

_MS_PER_DAY = 86_400_000
Num = int | float
# An absent raw field: msgspec.Raw cannot be part of a union with None.
_NONE = msgspec.Raw(b"")


class _Word(msgspec.Struct):
    start: Num | None = None
    end: Num | None = None


class _Entry(msgspec.Struct):
    """One entry of transcript_object / transcript_with_tool_calls / message_with_tool_calls."""

    role: str | None = None
    content: str | None = None
    words: list[_Word] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    arguments: Any = None
    successful: bool | None = None
    message_id: str | None = None
    created_timestamp: Num | None = None


class _CallAnalysis(msgspec.Struct):
    call_summary: str | None = None
    in_voicemail: bool | None = None
    user_sentiment: str | None = None
    call_successful: bool | None = None
    custom_analysis_data: msgspec.Raw = _NONE


class _Cost(msgspec.Struct):
    combined_cost: Num | None = None


class _LatencyBlock(msgspec.Struct):
    p50: Num | None = None
    p90: Num | None = None
    p99: Num | None = None


class _Latency(msgspec.Struct):
    e2e: _LatencyBlock | None = None


class _Call(msgspec.Struct):
    call_id: str
    agent_id: str | None = None
    agent_version: int | None = None
    agent_name: str | None = None
    call_type: str | None = None
    direction: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    call_status: str | None = None
    disconnection_reason: str | None = None
    start_timestamp: Num | None = None
    end_timestamp: Num | None = None
    duration_ms: Num | None = None
    transcript: str | None = None
    recording_url: str | None = None
    transfer_destination: msgspec.Raw = _NONE
    transfer_end_timestamp: Num | None = None
    opt_out_sensitive_data_storage: bool | None = None
    data_storage_setting: str | None = None
    call_analysis: _CallAnalysis | None = None
    call_cost: msgspec.Raw = _NONE
    latency: _Latency | None = None
    metadata: msgspec.Raw = _NONE
    retell_llm_dynamic_variables: msgspec.Raw = _NONE
    collected_dynamic_variables: msgspec.Raw = _NONE
    transcript_object: msgspec.Raw = _NONE
    transcript_with_tool_calls: msgspec.Raw = _NONE


class _CallBody(msgspec.Struct):
    call: _Call
    event: str | None = None


class _ChatAnalysis(msgspec.Struct):
    chat_summary: str | None = None
    user_sentiment: str | None = None
    chat_successful: bool | None = None
    custom_analysis_data: msgspec.Raw = _NONE


class _Chat(msgspec.Struct):
    chat_id: str
    agent_id: str | None = None
    version: int | None = None
    chat_type: str | None = None
    chat_status: str | None = None
    start_timestamp: Num | None = None
    end_timestamp: Num | None = None
    transcript: str | None = None
    chat_analysis: _ChatAnalysis | None = None
    chat_cost: msgspec.Raw = _NONE
    metadata: msgspec.Raw = _NONE
    retell_llm_dynamic_variables: msgspec.Raw = _NONE
    collected_dynamic_variables: msgspec.Raw = _NONE
    opt_out_sensitive_data_storage: bool | None = None
    data_storage_setting: str | None = None
    message_with_tool_calls: msgspec.Raw = _NONE


class _ChatBody(msgspec.Struct):
    chat: _Chat
    event: str | None = None


_CALL_DECODER = msgspec.json.Decoder(_CallBody)
_CHAT_DECODER = msgspec.json.Decoder(_ChatBody)
_ENTRIES_DECODER = msgspec.json.Decoder(list[msgspec.Raw])
_ENTRY_DECODER = msgspec.json.Decoder(_Entry)
_COST_DECODER = msgspec.json.Decoder(_Cost)
_ANY_DECODER = msgspec.json.Decoder()

# table name -> rows of one call or chat
Rows = dict[str, list[dict[str, Any]]]

TOOL_ROLES = frozenset({"tool_call_invocation", "tool_call_result"})
SPEECH_ROLES = frozenset({"agent", "user"})


def opted_out(opt_out: bool | None, storage: str | None) -> bool:
    """The call asked that transcripts, recordings and tool-call content not be stored."""
    return bool(opt_out) or storage == "basic_attributes_only"


def _absent(raw: msgspec.Raw) -> bool:
    return bytes(raw) in (b"", b"null")


def _raw_json(raw: msgspec.Raw) -> str | None:
    return None if _absent(raw) else bytes(raw).decode()


def _raw_text(raw: msgspec.Raw) -> str | None:
    """A JSON string as its text; any other JSON value as JSON text."""
    if _absent(raw):
        return None
    v = _ANY_DECODER.decode(raw)
    if v is None:
        return None
    return v if isinstance(v, str) else msgspec.json.encode(v).decode()


def _day(*ms: Num | None) -> int:
    for v in ms:
        if v is not None:
            return int(v) // _MS_PER_DAY
    raise AssertionError("the loaded_at fallback is never None")


def _int(v: Num | None) -> int | None:
    return None if v is None else int(v)


def _float(v: Num | None) -> float | None:
    return None if v is None else float(v)


def _entries(raw: msgspec.Raw, where: str) -> list[tuple[_Entry, msgspec.Raw]]:
    """Entries of a transcript list; each decoded with the fields we know, and kept raw too."""
    if _absent(raw):
        return []
    try:
        items = _ENTRIES_DECODER.decode(raw)
        return [(_ENTRY_DECODER.decode(r), r) for r in items]
    except msgspec.ValidationError as exc:
        raise RecordError(f"{where}: {exc}") from exc


def _detail(entry: _Entry, raw: msgspec.Raw) -> str | None:
    """Roles other than agent/user keep their whole entry (words aside) as JSON."""
    if entry.role in SPEECH_ROLES:
        return None
    obj = _ANY_DECODER.decode(raw)
    if isinstance(obj, dict):
        obj.pop("words", None)
    return msgspec.json.encode(obj).decode()


@dataclass
class Source:
    """Where one record came from."""

    partition: int
    offset: int
    received_at_ms: int | None
    loaded_at_ms: int


@dataclass
class Columns:
    """Column lists of one table, appended row by row and turned into one Arrow table."""

    table: Table
    data: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data = {c: [] for c in self.table.column_names}

    def __len__(self) -> int:
        return len(self.data[self.table.column_names[0]])

    def add(self, row: dict[str, Any]) -> None:
        for name, col in self.data.items():
            col.append(row.get(name))

    def arrow(self, drop: list[int] | None = None) -> pa.Table:
        schema = self.table.arrow_schema
        t = pa.Table.from_arrays([pa.array(self.data[f.name], type=f.type) for f in schema], schema=schema)
        if drop:
            keep = [True] * t.num_rows
            for i in drop:
                keep[i] = False
            t = t.filter(pa.array(keep))
        return t


class FamilyBatch:
    """The rows of one family (calls or chats) from one batch of records; the last delivery wins.

    Rows go into column lists as each record is decoded (memory stays near the size of the columns);
    an earlier delivery of the same key in the batch has its rows dropped when the tables are built.
    """

    def __init__(self, family: Family) -> None:
        self.family = family
        self._cols = {t.name: Columns(t) for t in family.tables}
        self._where: dict[str, dict[str, tuple[int, int]]] = {}
        self._drop: dict[str, list[int]] = {t.name: [] for t in family.tables}

    def __len__(self) -> int:
        return len(self._where)

    def add(self, value: bytes, source: Source) -> None:
        """Decode one record (raising RecordError if it cannot be loaded) and append its rows."""
        if self.family.parent is CALLS:
            try:
                obj: Any = _CALL_DECODER.decode(value).call
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise RecordError(f"call_analyzed body: {exc}") from exc
            key = obj.call_id
        else:
            try:
                obj = _CHAT_DECODER.decode(value).chat
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise RecordError(f"chat_analyzed body: {exc}") from exc
            key = obj.chat_id
        if not key:
            raise RecordError(f"{self.family.parent.parent_key} is empty")
        # Every check happens before the first append, so a bad record leaves no partial rows.
        built = _call_rows(obj, source) if self.family.parent is CALLS else _chat_rows(obj, source)
        old = self._where.pop(key, None)
        if old is not None:
            for name, (start, end) in old.items():
                self._drop[name].extend(range(start, end))
        where = {}
        for name, rows in built.items():
            cols = self._cols[name]
            start = len(cols)
            for r in rows:
                cols.add(r)
            where[name] = (start, len(cols))
        self._where[key] = where

    def tables(self) -> dict[str, pa.Table]:
        return {name: c.arrow(self._drop[name]) for name, c in self._cols.items()}

    def keys(self) -> Iterable[str]:
        return self._where.keys()


def _combined_cost(raw: msgspec.Raw, field: str) -> float | None:
    if _absent(raw):
        return None
    try:
        return _float(_COST_DECODER.decode(raw).combined_cost)
    except msgspec.ValidationError as exc:
        raise RecordError(f"{field}: {exc}") from exc


def _origin(day: int, src: Source) -> dict[str, Any]:
    """The columns every parent row ends with: its day and where the row came from."""
    return {
        "day": day,
        "event_received_at": src.received_at_ms,
        "kafka_partition": src.partition,
        "kafka_offset": src.offset,
        "loaded_at": src.loaded_at_ms,
    }


def _call_rows(c: _Call, src: Source) -> Rows:
    out = opted_out(c.opt_out_sensitive_data_storage, c.data_storage_setting)
    day = _day(c.start_timestamp, c.end_timestamp, src.received_at_ms, src.loaded_at_ms)
    transcript = c.transcript_with_tool_calls
    if _absent(transcript) or bytes(transcript) == b"[]":
        transcript = c.transcript_object
    utterances: list[dict[str, Any]] = []
    tools: dict[str, dict[str, Any]] = {}
    for e, raw in _entries(transcript, "call.transcript_with_tool_calls"):
        if e.role in TOOL_ROLES:
            _add_tool_entry(tools, e, c.call_id, day, out)
        elif not out:
            utterances.append(_utterance(e, raw, c.call_id, len(utterances), day))
    row = _call_row(c, out, day) | {"utterance_count": len(utterances), "tool_call_count": len(tools)}
    row |= _origin(day, src)
    return {CALLS.name: [row], CALL_UTTERANCES.name: utterances, CALL_TOOL_CALLS.name: list(tools.values())}


def _add_tool_entry(tools: dict[str, dict[str, Any]], e: _Entry, call_id: str, day: int, out: bool) -> None:
    """An invocation or a result joins its tool call's row; an opted-out call keeps name and outcome only."""
    if not e.tool_call_id:
        raise RecordError(f"call.transcript_with_tool_calls: a {e.role} entry has no tool_call_id")
    t = tools.setdefault(
        e.tool_call_id, {"call_id": call_id, "tool_call_id": e.tool_call_id, "seq": len(tools), "day": day}
    )
    if e.role == "tool_call_invocation":
        t["name"] = e.name
        if not out:
            args = e.arguments
            t["arguments"] = args if isinstance(args, str) or args is None else msgspec.json.encode(args).decode()
    else:
        t["successful"] = e.successful
        if not out:
            t["result"] = e.content


def _utterance(e: _Entry, raw: msgspec.Raw, call_id: str, turn: int, day: int) -> dict[str, Any]:
    words = e.words or []
    return {
        "call_id": call_id,
        "turn": turn,
        "role": e.role,
        "content": e.content,
        "start_s": _float(words[0].start) if words else None,
        "end_s": _float(words[-1].end) if words else None,
        "detail": _detail(e, raw),
        "day": day,
    }


def _call_row(c: _Call, out: bool, day: int) -> dict[str, Any]:
    """The `calls` row's own columns (the counts of its children and its origin are added by the caller)."""
    an = c.call_analysis or _CallAnalysis()
    e2e = (c.latency.e2e if c.latency else None) or _LatencyBlock()
    duration = c.duration_ms
    if duration is None and c.start_timestamp is not None and c.end_timestamp is not None:
        duration = int(c.end_timestamp) - int(c.start_timestamp)
    return {
        "call_id": c.call_id,
        "agent_id": c.agent_id,
        "agent_version": c.agent_version,
        "agent_name": c.agent_name,
        "call_type": c.call_type,
        "direction": c.direction,
        "from_number": c.from_number,
        "to_number": c.to_number,
        "call_status": c.call_status,
        "disconnection_reason": c.disconnection_reason,
        "start_timestamp": _int(c.start_timestamp),
        "end_timestamp": _int(c.end_timestamp),
        "duration_ms": _int(duration),
        "call_successful": an.call_successful,
        "user_sentiment": an.user_sentiment,
        "in_voicemail": an.in_voicemail,
        # A summary retells the conversation, so an opted-out call keeps none either.
        "call_summary": None if out else an.call_summary,
        "combined_cost": _combined_cost(c.call_cost, "call.call_cost"),
        "e2e_latency_p50": _float(e2e.p50),
        "e2e_latency_p90": _float(e2e.p90),
        "e2e_latency_p99": _float(e2e.p99),
        "transfer_destination": _raw_text(c.transfer_destination),
        "transfer_end_timestamp": _int(c.transfer_end_timestamp),
        "transcript": None if out else c.transcript,
        "recording_url": None if out else c.recording_url,
        "metadata": _raw_json(c.metadata),
        "dynamic_variables": _raw_json(c.retell_llm_dynamic_variables),
        "collected_dynamic_variables": _raw_json(c.collected_dynamic_variables),
        "custom_analysis_data": _raw_json(an.custom_analysis_data),
        "call_cost": _raw_json(c.call_cost),
        "data_storage_setting": c.data_storage_setting,
        "opted_out": out,
    }


def _chat_rows(c: _Chat, src: Source) -> Rows:
    out = opted_out(c.opt_out_sensitive_data_storage, c.data_storage_setting)
    day = _day(c.start_timestamp, c.end_timestamp, src.received_at_ms, src.loaded_at_ms)
    entries = _entries(c.message_with_tool_calls, "chat.message_with_tool_calls")  # malformed: dead letter
    messages = [] if out else [_chat_message(e, raw, c.chat_id, turn, day) for turn, (e, raw) in enumerate(entries)]
    an = c.chat_analysis or _ChatAnalysis()
    duration = None
    if c.start_timestamp is not None and c.end_timestamp is not None:
        duration = int(c.end_timestamp) - int(c.start_timestamp)
    row = {
        "chat_id": c.chat_id,
        "agent_id": c.agent_id,
        "agent_version": c.version,
        "chat_type": c.chat_type,
        "chat_status": c.chat_status,
        "start_timestamp": _int(c.start_timestamp),
        "end_timestamp": _int(c.end_timestamp),
        "duration_ms": duration,
        "chat_successful": an.chat_successful,
        "user_sentiment": an.user_sentiment,
        "chat_summary": None if out else an.chat_summary,
        "combined_cost": _combined_cost(c.chat_cost, "chat.chat_cost"),
        "transcript": None if out else c.transcript,
        "metadata": _raw_json(c.metadata),
        "dynamic_variables": _raw_json(c.retell_llm_dynamic_variables),
        "collected_dynamic_variables": _raw_json(c.collected_dynamic_variables),
        "custom_analysis_data": _raw_json(an.custom_analysis_data),
        "chat_cost": _raw_json(c.chat_cost),
        "message_count": len(messages),
    }
    return {CHATS.name: [row | _origin(day, src)], CHAT_MESSAGES.name: messages}


def _chat_message(e: _Entry, raw: msgspec.Raw, chat_id: str, turn: int, day: int) -> dict[str, Any]:
    content = e.content
    if e.role == "tool_call_invocation":
        args = e.arguments
        content = args if isinstance(args, str) or args is None else msgspec.json.encode(args).decode()
    return {
        "chat_id": chat_id,
        "turn": turn,
        "message_id": e.message_id,
        "role": e.role,
        "content": content,
        "created_at": _int(e.created_timestamp),
        "tool_call_id": e.tool_call_id,
        "name": e.name,
        "successful": e.successful,
        "detail": None if e.role in SPEECH_ROLES or e.role in TOOL_ROLES else _detail(e, raw),
        "day": day,
    }
