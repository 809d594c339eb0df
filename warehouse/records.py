"""From a webhook body to warehouse rows. Unknown fields are ignored, missing ones become NULL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from warehouse.errors import RecordError


def ms_to_ts(ms: Any) -> datetime | None:
    """Unix ms to a naive UTC datetime (DuckDB TIMESTAMP), or None."""
    if ms is None:
        return None
    try:
        return datetime.fromtimestamp(int(ms) / 1000, tz=UTC).replace(tzinfo=None)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RecordError(f"timestamp {ms!r} is not unix milliseconds") from exc


def _json(v: Any) -> str | None:
    return None if v is None else orjson.dumps(v).decode()


def _num(v: Any, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise RecordError(f"{what} is {v!r}, not a number")
    return float(v)


def opted_out(call: dict[str, Any]) -> bool:
    """The call asked that transcripts, recordings and tool-call content not be stored."""
    return bool(call.get("opt_out_sensitive_data_storage")) or (
        call.get("data_storage_setting") == "basic_attributes_only"
    )


def call_row(call: dict[str, Any]) -> dict[str, Any]:
    """The `calls` row of one call object (without the source columns)."""
    if not isinstance(call, dict) or not call.get("call_id"):
        raise RecordError("the body has no call object with a call_id")
    analysis = call.get("call_analysis") or {}
    cost = call.get("call_cost") or {}
    e2e = (call.get("latency") or {}).get("e2e") or {}
    out = opted_out(call)
    start, end = call.get("start_timestamp"), call.get("end_timestamp")
    duration = call.get("duration_ms")
    if duration is None and start is not None and end is not None:
        duration = int(end) - int(start)
    return {
        "call_id": str(call["call_id"]),
        "agent_id": call.get("agent_id"),
        "agent_version": call.get("agent_version"),
        "call_type": call.get("call_type"),
        "direction": call.get("direction"),
        "from_number": call.get("from_number"),
        "to_number": call.get("to_number"),
        "call_status": call.get("call_status"),
        "disconnection_reason": call.get("disconnection_reason"),
        "start_timestamp": ms_to_ts(start),
        "end_timestamp": ms_to_ts(end),
        "duration_ms": duration,
        "call_successful": analysis.get("call_successful"),
        "user_sentiment": analysis.get("user_sentiment"),
        "in_voicemail": analysis.get("in_voicemail"),
        "call_summary": analysis.get("call_summary"),
        "combined_cost": _num(cost.get("combined_cost"), "call_cost.combined_cost"),
        "e2e_latency_p50": _num(e2e.get("p50"), "latency.e2e.p50"),
        "transcript": None if out else call.get("transcript"),
        "recording_url": None if out else call.get("recording_url"),
        "metadata": _json(call.get("metadata")),
        "dynamic_variables": _json(call.get("retell_llm_dynamic_variables")),
        "custom_analysis_data": _json(analysis.get("custom_analysis_data")),
        "opted_out": out,
    }


def parse_body(value: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"the message is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise RecordError("the message is not a JSON object")
    return body
