"""Realistic Retell/UponAI webhook traffic: call and chat objects and the events of their lifecycles.

The objects follow retell-sdk's `PhoneCallResponse`, `WebCallResponse` and `ChatResponse` models
(the test suite checks that they parse), and the lifecycles follow the platforms' pages: a call
that never connected has no `call_started`, `transcript_updated` repeats as the transcript grows,
`call_analyzed` comes last, transfers emit `transfer_*` events.
"""

from __future__ import annotations

import random
import string
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

SCENARIOS: dict[str, float] = {
    # name: share of traffic
    "completed": 0.46,
    "web_call": 0.08,
    "voicemail": 0.06,
    "failed_dial": 0.10,
    "error": 0.04,
    "transfer_bridged": 0.07,
    "transfer_cancelled": 0.03,
    "opt_out": 0.04,
    "unsuccessful": 0.06,
    "chat": 0.06,
}

FAILED_DIAL_REASONS = ("dial_failed", "dial_no_answer", "dial_busy", "invalid_destination")
ERROR_REASONS = ("error_llm_websocket_lost_connection", "error_asr", "error_no_audio_received", "error_unknown")
NORMAL_REASONS = ("user_hangup", "agent_hangup", "user_hangup", "agent_hangup", "inactivity")

_AGENT_LINES = (
    "Thanks for calling Bright Dental, this is Ava. How can I help you today?",
    "I can help you with that. Could you tell me your full name, please?",
    "Thank you. And what is the best phone number to reach you at?",
    "Let me check the schedule for next week. One moment please.",
    "I have Tuesday at ten in the morning or Thursday at two in the afternoon. Which works better?",
    "Great, you are booked. You will get a text confirmation shortly.",
    "Is there anything else I can help you with today?",
    "I understand. Let me transfer you to someone from our billing team.",
    "I am sorry to hear that. Let me see what I can do about it.",
)
_USER_LINES = (
    "Hi, I would like to book a cleaning appointment.",
    "Sure, it is Jordan Miller.",
    "You can reach me at the number I am calling from.",
    "Thursday afternoon works better for me.",
    "No, that is all, thank you so much.",
    "Actually I have a question about my last bill, it looks wrong.",
    "I have been waiting for a callback for two weeks now.",
    "Can you repeat that please? The line is a bit noisy.",
)
_TOOLS = ("check_availability", "book_appointment", "lookup_customer", "send_sms_confirmation")


def _id(rng: random.Random, n: int = 32) -> str:
    return "".join(rng.choices(string.ascii_letters + string.digits, k=n))


def _phone(rng: random.Random) -> str:
    return "+1" + "".join(rng.choices(string.digits, k=10))


@dataclass(frozen=True, slots=True)
class Event:
    """One webhook body, ready to sign and send."""

    event: str
    key: str
    payload: dict[str, Any]

    def body(self) -> bytes:
        return orjson.dumps(self.payload)


@dataclass
class Fleet:
    """The agents that make the traffic; a fixed seed gives the same ids every time."""

    seed: int = 7
    agents: int = 5
    agent_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        if not self.agent_ids:
            self.agent_ids = ["agent_" + _id(rng, 24) for _ in range(self.agents)]


def _utterances(rng: random.Random, turns: int, start_s: float = 0.5) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    t = start_s
    for i in range(turns):
        role = "agent" if i % 2 == 0 else "user"
        text = rng.choice(_AGENT_LINES if role == "agent" else _USER_LINES)
        words = []
        for w in text.split():
            dur = 0.18 + rng.random() * 0.25
            words.append({"word": w, "start": round(t, 3), "end": round(t + dur, 3)})
            t += dur + 0.04
        out.append({"role": role, "content": text, "words": words})
        t += 0.6 + rng.random()
    return out


def _with_tool_calls(rng: random.Random, utterances: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Interleave tool calls after some agent turns; return the list and how many calls there are."""
    out: list[dict[str, Any]] = []
    n = 0
    for i, u in enumerate(utterances):
        out.append({"role": u["role"], "content": u["content"], "words": u["words"]})
        if u["role"] == "agent" and i in (2, 4) and rng.random() < 0.7:
            n += 1
            tid = "tool_call_" + _id(rng, 12)
            name = rng.choice(_TOOLS)
            out.append(
                {
                    "role": "tool_call_invocation",
                    "tool_call_id": tid,
                    "name": name,
                    "arguments": orjson.dumps({"date": "2026-12-01", "slot": "14:00"}).decode(),
                }
            )
            ok = rng.random() < 0.9
            out.append(
                {
                    "role": "tool_call_result",
                    "tool_call_id": tid,
                    "successful": ok,
                    "content": orjson.dumps({"ok": ok, "slots": ["10:00", "14:00"]}).decode(),
                }
            )
    return out, n


def _latency(rng: random.Random) -> dict[str, Any]:
    def block(base: float) -> dict[str, Any]:
        vals = sorted(base * (0.7 + rng.random() * 0.8) for _ in range(8))
        return {
            "p50": round(vals[4], 1),
            "p90": round(vals[7], 1),
            "p95": round(vals[7], 1),
            "p99": round(vals[7], 1),
            "min": round(vals[0], 1),
            "max": round(vals[7], 1),
            "num": len(vals),
            "values": [round(v, 1) for v in vals],
        }

    return {"e2e": block(900), "llm": block(450), "tts": block(180), "asr": block(120)}


class CallFactory:
    """Makes one call's (or chat's) events, in the order the platform sends them."""

    # 16-34 turns (about 1.5-3 minutes of talk) make connected calls' call_analyzed bodies average
    # ~26 KB, as the platform's are: each turn carries its words with timestamps twice.
    def __init__(self, fleet: Fleet | None = None, seed: int | None = None, turns: tuple[int, int] = (16, 34)):
        self.fleet = fleet or Fleet()
        self.rng = random.Random(seed)
        self.turns = turns

    def scenario(self) -> str:
        names = list(SCENARIOS)
        return self.rng.choices(names, weights=[SCENARIOS[n] for n in names])[0]

    def events(self, scenario: str | None = None, now_ms: int | None = None, **overrides: Any) -> list[Event]:
        scenario = scenario or self.scenario()
        if scenario == "chat":
            return self._chat(now_ms, **overrides)
        return self._call(scenario, now_ms, **overrides)

    # -- calls --------------------------------------------------------------------------------

    def _call(self, scenario: str, now_ms: int | None, **overrides: Any) -> list[Event]:
        rng = self.rng
        now = int(time.time() * 1000) if now_ms is None else now_ms
        connected = scenario not in ("failed_dial",)
        web = scenario == "web_call"
        direction = rng.choice(("inbound", "outbound"))
        base: dict[str, Any] = {
            "call_id": "call_" + _id(rng, 28),
            "call_type": "web_call" if web else "phone_call",
            "agent_id": rng.choice(self.fleet.agent_ids),
            "agent_version": rng.choice((1, 2, 3)),
            "agent_name": "Front desk",
            "call_status": "registered",
            "metadata": {"campaign": rng.choice(("renewals", "reminders", "inbound"))},
            "retell_llm_dynamic_variables": {"customer_name": "Jordan Miller"},
            "data_storage_setting": "everything",
            "opt_in_signed_url": False,
            "start_timestamp": now,
        }
        if web:
            base["access_token"] = "eyJ" + _id(rng, 60)
        else:
            base.update(direction=direction, from_number=_phone(rng), to_number=_phone(rng))
            base["telephony_identifier"] = {"twilio_call_sid": "CA" + _id(rng, 32).lower()}
        if scenario == "opt_out":
            base["opt_out_sensitive_data_storage"] = True
            base["data_storage_setting"] = "basic_attributes_only"
        base.update(overrides)
        cid = base["call_id"]
        out: list[Event] = []

        if not connected:
            reason = rng.choice(FAILED_DIAL_REASONS)
            ended = {
                **base,
                "call_status": "not_connected",
                "end_timestamp": now + 1500 + rng.randint(0, 20000),
                "disconnection_reason": reason,
                "duration_ms": 0,
                "transcript": "",
                "transcript_object": [],
                "transcript_with_tool_calls": [],
            }
            ended["call_cost"] = self._cost(0)
            out.append(Event("call_ended", cid, {"event": "call_ended", "call": ended}))
            analysis = {
                "call_summary": "The call did not connect.",
                "in_voicemail": False,
                "user_sentiment": "Unknown",
                "call_successful": False,
                "custom_analysis_data": {},
            }
            out.append(
                Event("call_analyzed", cid, {"event": "call_analyzed", "call": {**ended, "call_analysis": analysis}})
            )
            return out

        started = {**base, "call_status": "ongoing"}
        out.append(Event("call_started", cid, {"event": "call_started", "call": started}))
        lo, hi = self.turns
        turns = 2 if scenario == "voicemail" else rng.randint(lo, hi)
        if scenario == "error":
            turns = rng.randint(1, 4)
        utts = _utterances(rng, turns)
        with_tools, _ = _with_tool_calls(rng, utts)
        # transcript_updated repeats with a growing transcript (a few snapshots, the last one full).
        for k in sorted({max(1, turns // 3), max(1, 2 * turns // 3), turns}):
            part = utts[:k]
            snap = {
                **started,
                "transcript": _text(part),
                "transcript_object": part,
                "transcript_with_tool_calls": [u for u in with_tools if u.get("role") in ("agent", "user")][:k],
            }
            out.append(Event("transcript_updated", cid, {"event": "transcript_updated", "call": snap}))

        duration = int((utts[-1]["words"][-1]["end"] + 1.5) * 1000) if utts else 4000
        end = now + duration
        reason = rng.choice(NORMAL_REASONS)
        successful = True
        sentiment = rng.choice(("Positive", "Positive", "Neutral"))
        in_voicemail = False
        if scenario == "voicemail":
            reason, successful, sentiment, in_voicemail = "voicemail_reached", False, "Unknown", True
        elif scenario == "error":
            reason, successful, sentiment = rng.choice(ERROR_REASONS), False, "Neutral"
        elif scenario == "unsuccessful":
            successful, sentiment = False, "Negative"
        elif scenario in ("transfer_bridged", "transfer_cancelled"):
            dest = {"number": _phone(rng), "extension": str(rng.randint(100, 999))}
            opt = {"type": "warm_transfer", "showTransfereeAsCaller": True, "agentDetectionTimeoutMs": 15000}
            xfer = {**started, "transfer_destination": dest["number"]}
            extra = {"transfer_destination": dest, "transfer_option": opt}
            out.append(Event("transfer_started", cid, {"event": "transfer_started", "call": xfer, **extra}))
            if scenario == "transfer_bridged":
                out.append(Event("transfer_bridged", cid, {"event": "transfer_bridged", "call": xfer, **extra}))
                out.append(Event("transfer_ended", cid, {"event": "transfer_ended", "call": xfer}))
                reason = "call_transfer"
            else:
                out.append(Event("transfer_cancelled", cid, {"event": "transfer_cancelled", "call": xfer, **extra}))
                reason, successful, sentiment = "transfer_cancelled", False, "Negative"

        ended = {
            **started,
            "call_status": "error" if scenario == "error" else "ended",
            "end_timestamp": end,
            "duration_ms": duration,
            "disconnection_reason": reason,
            "transcript": _text(utts),
            "transcript_object": utts,
            "transcript_with_tool_calls": with_tools,
            "recording_url": f"https://recordings.example.com/{cid}.wav",
            "public_log_url": f"https://logs.example.com/{cid}.txt",
            "latency": _latency(rng),
            "call_cost": self._cost(duration),
            "llm_token_usage": {
                "average": 1800.0,
                "num_requests": float(turns // 2 + 1),
                "values": [1700.0, 1800.0, 1900.0],
            },
            "collected_dynamic_variables": {"appointment": "2026-12-01T14:00"},
        }
        if scenario in ("transfer_bridged", "transfer_cancelled"):
            ended["transfer_destination"] = xfer["transfer_destination"]
            ended["transfer_end_timestamp"] = end
        out.append(Event("call_ended", cid, {"event": "call_ended", "call": ended}))
        analysis = {
            "call_summary": "The caller booked a cleaning appointment for Thursday at two."
            if successful
            else "The caller's request was not resolved.",
            "in_voicemail": in_voicemail,
            "user_sentiment": sentiment,
            "call_successful": successful,
            "custom_analysis_data": {"appointment_booked": successful, "topic": "scheduling"},
        }
        out.append(
            Event("call_analyzed", cid, {"event": "call_analyzed", "call": {**ended, "call_analysis": analysis}})
        )
        return out

    def _cost(self, duration_ms: int) -> dict[str, Any]:
        secs = duration_ms / 1000
        voice = round(secs / 60 * 7.0, 4)
        llm = round(secs / 60 * 1.5, 4)
        return {
            "product_costs": [
                {"product": "elevenlabs_tts", "unit_price": 7.0, "cost": voice},
                {"product": "gpt_4o_mini", "unit_price": 1.5, "cost": llm},
            ],
            "combined_cost": round(voice + llm, 4),
            "total_duration_seconds": secs,
            "total_duration_unit_price": 8.5,
        }

    # -- chats --------------------------------------------------------------------------------

    def _chat(self, now_ms: int | None, **overrides: Any) -> list[Event]:
        rng = self.rng
        now = int(time.time() * 1000) if now_ms is None else now_ms
        base: dict[str, Any] = {
            "chat_id": "chat_" + _id(rng, 28),
            "agent_id": rng.choice(self.fleet.agent_ids),
            "chat_status": "ongoing",
            "chat_type": rng.choice(("api_chat", "sms_chat")),
            "start_timestamp": now,
            "metadata": {},
            "retell_llm_dynamic_variables": {"customer_name": "Sam"},
            "version": 1,
        }
        base.update(overrides)
        cid = base["chat_id"]
        msgs = []
        t = now
        for i in range(rng.randint(4, 10)):
            role = "agent" if i % 2 == 0 else "user"
            t += rng.randint(2000, 30000)
            msgs.append(
                {
                    "message_id": "msg_" + _id(rng, 16),
                    "role": role,
                    "created_timestamp": t,
                    "content": rng.choice(_AGENT_LINES if role == "agent" else _USER_LINES),
                }
            )
        successful = rng.random() < 0.8
        ended = {
            **base,
            "chat_status": "ended",
            "end_timestamp": t,
            "transcript": _text(msgs),
            "message_with_tool_calls": msgs,
            "chat_cost": {
                "combined_cost": round(len(msgs) * 0.2, 3),
                "product_costs": [{"product": "gpt_4o_mini", "cost": round(len(msgs) * 0.2, 3)}],
            },
        }
        analysis = {
            "chat_summary": "The user asked about an appointment.",
            "chat_successful": successful,
            "user_sentiment": "Positive" if successful else "Negative",
            "custom_analysis_data": {},
        }
        return [
            Event("chat_started", cid, {"event": "chat_started", "chat": base}),
            Event("chat_ended", cid, {"event": "chat_ended", "chat": ended}),
            Event("chat_analyzed", cid, {"event": "chat_analyzed", "chat": {**ended, "chat_analysis": analysis}}),
        ]


def _text(utts: list[dict[str, Any]]) -> str:
    return "\n".join(f"{'Agent' if u['role'] == 'agent' else 'User'}: {u['content']}" for u in utts)
