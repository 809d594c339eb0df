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

from kernel.catalogue import EVENTS_BY_NAME, EventName

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


@dataclass(frozen=True, slots=True)
class _Talk:
    """What was said on a connected call: its turns, with and without tool calls."""

    utterances: list[dict[str, Any]]
    with_tools: list[dict[str, Any]]

    @property
    def duration_ms(self) -> int:
        u = self.utterances
        return int((u[-1]["words"][-1]["end"] + 1.5) * 1000) if u else 4000


@dataclass(slots=True)
class _Outcome:
    """How a connected call ended, as its call_ended and call_analysis tell it."""

    reason: str
    sentiment: str
    successful: bool = True
    in_voicemail: bool = False
    transfer_destination: str | None = None

    def analysis(self) -> dict[str, Any]:
        summary = (
            "The caller booked a cleaning appointment for Thursday at two."
            if self.successful
            else "The caller's request was not resolved."
        )
        return {
            "call_summary": summary,
            "in_voicemail": self.in_voicemail,
            "user_sentiment": self.sentiment,
            "call_successful": self.successful,
            "custom_analysis_data": {"appointment_booked": self.successful, "topic": "scheduling"},
        }


def _event(name: EventName, obj: dict[str, Any], **extra: Any) -> Event:
    """One delivery's body: the event's subject object under its name, keyed by its id (the catalogue's)."""
    kind = EVENTS_BY_NAME[name]
    return Event(name.value, str(obj[kind.key_field]), {"event": name.value, kind.subject.value: obj, **extra})


def _now(now_ms: int | None) -> int:
    return int(time.time() * 1000) if now_ms is None else now_ms


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
            return self._chat(_now(now_ms), overrides)
        base = self._call_base(scenario, _now(now_ms), overrides)
        if scenario == "failed_dial":
            return self._failed_dial(base)
        return self._connected(scenario, base)

    # -- calls --------------------------------------------------------------------------------

    def _call_base(self, scenario: str, now: int, overrides: dict[str, Any]) -> dict[str, Any]:
        """The call object as registered: ids, agent, numbers (or a web call's token), storage setting."""
        rng = self.rng
        direction = rng.choice(("inbound", "outbound"))
        web = scenario == "web_call"
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
        return base

    def _failed_dial(self, base: dict[str, Any]) -> list[Event]:
        """A call that never connected: no call_started, an empty transcript, then its analysis."""
        reason = self.rng.choice(FAILED_DIAL_REASONS)
        ended = {
            **base,
            "call_status": "not_connected",
            "end_timestamp": base["start_timestamp"] + 1500 + self.rng.randint(0, 20000),
            "disconnection_reason": reason,
            "duration_ms": 0,
            "transcript": "",
            "transcript_object": [],
            "transcript_with_tool_calls": [],
        }
        ended["call_cost"] = self._cost(0)
        analysis = {
            "call_summary": "The call did not connect.",
            "in_voicemail": False,
            "user_sentiment": "Unknown",
            "call_successful": False,
            "custom_analysis_data": {},
        }
        return [
            _event(EventName.CALL_ENDED, ended),
            _event(EventName.CALL_ANALYZED, {**ended, "call_analysis": analysis}),
        ]

    def _connected(self, scenario: str, base: dict[str, Any]) -> list[Event]:
        started = {**base, "call_status": "ongoing"}
        talk = self._talk(scenario)
        out = [_event(EventName.CALL_STARTED, started), *_transcript_updates(started, talk)]
        outcome = self._outcome(scenario)
        out += self._transfer(scenario, started, outcome)
        ended = self._ended(scenario, started, talk, outcome)
        out.append(_event(EventName.CALL_ENDED, ended))
        out.append(_event(EventName.CALL_ANALYZED, {**ended, "call_analysis": outcome.analysis()}))
        return out

    def _talk(self, scenario: str) -> _Talk:
        lo, hi = self.turns
        turns = 2 if scenario == "voicemail" else self.rng.randint(lo, hi)
        if scenario == "error":
            turns = self.rng.randint(1, 4)
        utts = _utterances(self.rng, turns)
        with_tools, _ = _with_tool_calls(self.rng, utts)
        return _Talk(utts, with_tools)

    def _outcome(self, scenario: str) -> _Outcome:
        rng = self.rng
        o = _Outcome(reason=rng.choice(NORMAL_REASONS), sentiment=rng.choice(("Positive", "Positive", "Neutral")))
        if scenario == "voicemail":
            o.reason, o.successful, o.sentiment, o.in_voicemail = "voicemail_reached", False, "Unknown", True
        elif scenario == "error":
            o.reason, o.successful, o.sentiment = rng.choice(ERROR_REASONS), False, "Neutral"
        elif scenario == "unsuccessful":
            o.successful, o.sentiment = False, "Negative"
        elif scenario == "transfer_bridged":
            o.reason = "call_transfer"
        elif scenario == "transfer_cancelled":
            o.reason, o.successful, o.sentiment = "transfer_cancelled", False, "Negative"
        return o

    def _transfer(self, scenario: str, started: dict[str, Any], outcome: _Outcome) -> list[Event]:
        """The transfer_* events of a transferred call (none for other calls)."""
        if scenario not in ("transfer_bridged", "transfer_cancelled"):
            return []
        dest = {"number": _phone(self.rng), "extension": str(self.rng.randint(100, 999))}
        outcome.transfer_destination = dest["number"]
        opt = {"type": "warm_transfer", "showTransfereeAsCaller": True, "agentDetectionTimeoutMs": 15000}
        xfer = {**started, "transfer_destination": dest["number"]}
        extra = {"transfer_destination": dest, "transfer_option": opt}
        out = [_event(EventName.TRANSFER_STARTED, xfer, **extra)]
        if scenario == "transfer_bridged":
            out.append(_event(EventName.TRANSFER_BRIDGED, xfer, **extra))
            out.append(_event(EventName.TRANSFER_ENDED, xfer))
        else:
            out.append(_event(EventName.TRANSFER_CANCELLED, xfer, **extra))
        return out

    def _ended(self, scenario: str, started: dict[str, Any], talk: _Talk, outcome: _Outcome) -> dict[str, Any]:
        """The call object of call_ended: the full transcript, latency, cost and token usage."""
        duration, cid = talk.duration_ms, started["call_id"]
        end = started["start_timestamp"] + duration
        ended = {
            **started,
            "call_status": "error" if scenario == "error" else "ended",
            "end_timestamp": end,
            "duration_ms": duration,
            "disconnection_reason": outcome.reason,
            "transcript": _text(talk.utterances),
            "transcript_object": talk.utterances,
            "transcript_with_tool_calls": talk.with_tools,
            "recording_url": f"https://recordings.example.com/{cid}.wav",
            "public_log_url": f"https://logs.example.com/{cid}.txt",
            "latency": _latency(self.rng),
            "call_cost": self._cost(duration),
            "llm_token_usage": {
                "average": 1800.0,
                "num_requests": float(len(talk.utterances) // 2 + 1),
                "values": [1700.0, 1800.0, 1900.0],
            },
            "collected_dynamic_variables": {"appointment": "2026-12-01T14:00"},
        }
        if outcome.transfer_destination is not None:
            ended["transfer_destination"] = outcome.transfer_destination
            ended["transfer_end_timestamp"] = end
        return ended

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

    def _chat(self, now: int, overrides: dict[str, Any]) -> list[Event]:
        rng = self.rng
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
        msgs = self._messages(now)
        successful = rng.random() < 0.8
        cost = round(len(msgs) * 0.2, 3)
        ended = {
            **base,
            "chat_status": "ended",
            "end_timestamp": msgs[-1]["created_timestamp"],
            "transcript": _text(msgs),
            "message_with_tool_calls": msgs,
            "chat_cost": {"combined_cost": cost, "product_costs": [{"product": "gpt_4o_mini", "cost": cost}]},
        }
        analysis = {
            "chat_summary": "The user asked about an appointment.",
            "chat_successful": successful,
            "user_sentiment": "Positive" if successful else "Negative",
            "custom_analysis_data": {},
        }
        return [
            _event(EventName.CHAT_STARTED, base),
            _event(EventName.CHAT_ENDED, ended),
            _event(EventName.CHAT_ANALYZED, {**ended, "chat_analysis": analysis}),
        ]

    def _messages(self, now: int) -> list[dict[str, Any]]:
        rng = self.rng
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
        return msgs


def _transcript_updates(started: dict[str, Any], talk: _Talk) -> list[Event]:
    """transcript_updated repeats with a growing transcript: a few snapshots, the last one full."""
    utts, turns = talk.utterances, len(talk.utterances)
    spoken = [u for u in talk.with_tools if u.get("role") in ("agent", "user")]
    out = []
    for k in sorted({max(1, turns // 3), max(1, 2 * turns // 3), turns}):
        part = utts[:k]
        snap = {
            **started,
            "transcript": _text(part),
            "transcript_object": part,
            "transcript_with_tool_calls": spoken[:k],
        }
        out.append(_event(EventName.TRANSCRIPT_UPDATED, snap))
    return out


def _text(utts: list[dict[str, Any]]) -> str:
    return "\n".join(f"{'Agent' if u['role'] == 'agent' else 'User'}: {u['content']}" for u in utts)
