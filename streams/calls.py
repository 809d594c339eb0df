"""Per-call state and what each event changes: the place where the sender's habits are resolved.

Retell sends no event id, retries deliveries, repeats `transcript_updated` with a growing
transcript, sends no `call_started` for a call that never connected, may send `call_analyzed` long
after `call_ended` (or, reordered, before it). The state of a call remembers which lifecycle events
were counted, whether its outcome (reason, duration, cost, latency) was counted, how long its
transcript was, and which alerts it raised, so that a duplicate never counts twice and every
metric counts a call once, whatever order its events come in.
"""

from __future__ import annotations

import msgspec

from kernel.catalogue import EVENT_NAMES, UNKNOWN
from streams.alertrules import RULE_BIT, AlertConfig
from streams.metrics import Effects

EVENT_BIT: dict[str, int] = {name: 1 << i for i, name in enumerate(EVENT_NAMES)}
_COUNTERS = {
    "call_started": "calls_started",
    "call_ended": "calls_ended",
    "call_analyzed": "calls_analyzed",
    "transfer_started": "transfers_started",
    "transfer_bridged": "transfers_bridged",
    "transfer_cancelled": "transfers_cancelled",
    "transfer_ended": "transfers_ended",
    "chat_started": "chats_started",
    "chat_ended": "chats_ended",
    "chat_analyzed": "chats_analyzed",
}
_OUTCOME_EVENTS = frozenset({"call_ended", "call_analyzed"})
UNKNOWN_AGENT = "unknown"


# -- the fields we read (msgspec skips everything else, which keeps decoding cheap) ----------------


class _P50(msgspec.Struct):
    p50: float | None = None


class _Latency(msgspec.Struct):
    e2e: _P50 | None = None


class _Cost(msgspec.Struct):
    combined_cost: float | None = None


class _Analysis(msgspec.Struct):
    call_successful: bool | None = None
    chat_successful: bool | None = None
    user_sentiment: str | None = None
    in_voicemail: bool | None = None


class Subject(msgspec.Struct):
    call_id: str | None = None
    chat_id: str | None = None
    agent_id: str | None = None
    call_status: str | None = None
    disconnection_reason: str | None = None
    duration_ms: float | None = None
    # Only its length matters (a growing transcript is news): kept as the raw JSON slice, so the
    # largest string of the body is never decoded.
    transcript: msgspec.Raw = msgspec.Raw(b"null")
    call_cost: _Cost | None = None
    chat_cost: _Cost | None = None
    latency: _Latency | None = None
    call_analysis: _Analysis | None = None
    chat_analysis: _Analysis | None = None


class Body(msgspec.Struct):
    event: str = ""
    call: Subject | None = None
    chat: Subject | None = None


decode_body = msgspec.json.Decoder(Body).decode


class CallState(msgspec.Struct, array_like=True, omit_defaults=True):
    """What the stream remembers about one call (or chat), stored in the table under its id."""

    agent: str = ""
    seen: int = 0  # EVENT_BIT of each lifecycle event already counted
    outcome: bool = False  # reason, connected, duration, cost and latency were counted
    connected: bool = False
    voicemail: bool = False
    transcript_len: int = -1
    alerts: int = 0  # RULE_BIT of each per-call alert already raised


class Raised(msgspec.Struct):
    """A per-call alert to publish: the rule and what it says."""

    rule: str
    reason: str


def apply_event(
    state: CallState | None, event: str, body: Body, rules: AlertConfig
) -> tuple[CallState, Effects, list[Raised]]:
    """The call's new state, the metric changes and the alerts one delivery of `event` causes.

    A repeated delivery returns empty effects and no alert.
    """
    fx = Effects()
    raised: list[Raised] = []
    subject = body.chat if event.startswith("chat_") else body.call
    if subject is None:
        subject = body.call or body.chat or Subject()
    st = CallState() if state is None else state
    new = state is None
    if new:
        st.agent = subject.agent_id or UNKNOWN_AGENT
        fx.inc("chats" if event.startswith("chat_") else "calls")
    elif st.agent == UNKNOWN_AGENT and subject.agent_id:
        st.agent = subject.agent_id

    if event == "transcript_updated":
        raw = subject.transcript
        n = 0 if bytes(raw) == b"null" else len(raw)
        if n > st.transcript_len:  # a repeat of a snapshot we already counted is not news
            st.transcript_len = n
            fx.inc("event:transcript_updated")
        return st, fx, raised

    bit = EVENT_BIT.get(event)
    if bit is None:  # an event type the catalogue does not know: counted, nothing else
        fx.inc(f"event:{event or UNKNOWN}")
        return st, fx, raised
    if st.seen & bit:
        return st, fx, raised
    st.seen |= bit
    fx.inc(f"event:{event}")
    fx.inc(_COUNTERS[event])

    if event == "call_started":
        if not st.outcome:  # reordered: the call ended already
            fx.inc("active_calls")
    elif event in _OUTCOME_EVENTS:
        if not st.outcome:
            _outcome(st, subject, fx, raised, rules)
        if event == "call_analyzed":
            _analysis(st, subject, fx, raised, rules)
    elif event == "transfer_cancelled" and rules.transfer_cancelled.enabled:
        _raise(st, "transfer_cancelled", "transfer cancelled", raised)
    elif event == "chat_analyzed":
        a = subject.chat_analysis
        if a is not None and a.chat_successful is True:
            fx.inc("chats_successful")
    return st, fx, raised


def _raise(st: CallState, rule: str, reason: str, raised: list[Raised]) -> None:
    bit = RULE_BIT[rule]
    if not st.alerts & bit:
        st.alerts |= bit
        raised.append(Raised(rule, reason))


def _outcome(st: CallState, s: Subject, fx: Effects, raised: list[Raised], rules: AlertConfig) -> None:
    """Count the call's ending once, from whichever of call_ended / call_analyzed came first."""
    st.outcome = True
    if st.seen & EVENT_BIT["call_started"]:
        fx.inc("active_calls", -1)
    fx.inc("calls_finished")
    reason = s.disconnection_reason or "unknown"
    fx.inc(f"reason:{reason}")
    failed_dial = rules.is_failed_dial(reason)
    connected = not failed_dial and s.call_status != "not_connected"
    st.connected = connected
    fx.inc("connected" if connected else "not_connected")
    if failed_dial or rules.is_error(reason) or s.call_status == "not_connected":
        fx.inc("failed")
    if connected and s.duration_ms is not None:
        fx.durations.append(float(s.duration_ms))
    cost = s.call_cost.combined_cost if s.call_cost is not None else None
    if cost:
        fx.cost += cost
    if s.latency is not None and s.latency.e2e is not None and s.latency.e2e.p50 is not None:
        fx.latencies.append(s.latency.e2e.p50)
    if failed_dial or s.call_status == "not_connected":
        if rules.failed_dial.enabled:
            _raise(st, "failed_dial", reason, raised)
    elif rules.is_error(reason) and rules.error.enabled:
        _raise(st, "error", reason, raised)


def _analysis(st: CallState, s: Subject, fx: Effects, raised: list[Raised], rules: AlertConfig) -> None:
    a = s.call_analysis
    if a is None:
        return
    if a.in_voicemail:
        st.voicemail = True
    if a.call_successful is True:
        fx.inc("calls_successful")
    elif a.call_successful is False:
        fx.inc("calls_unsuccessful")
        ur = rules.unsuccessful
        if ur.enabled and st.connected and not (ur.ignore_voicemail and st.voicemail):
            _raise(st, "unsuccessful", "call_successful is false", raised)
    if a.user_sentiment:
        fx.inc(f"sentiment:{a.user_sentiment}")
        if rules.negative_sentiment.enabled and a.user_sentiment in rules.negative_sentiment.sentiments:
            _raise(st, "negative_sentiment", f"user sentiment {a.user_sentiment}", raised)
