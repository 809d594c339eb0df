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

from kernel.catalogue import UNKNOWN, EventName, Subject, subject_of
from streams.alertrules import RULE_BIT, AlertConfig
from streams.metrics import Effects

# Bit of each event in CallState.seen. The bits are stored in the table, so they follow the
# catalogue's order: a new event type must be appended to EventName, never inserted.
EVENT_BIT: dict[str, int] = {name: 1 << i for i, name in enumerate(EventName)}
# Either of these carries the call's outcome (reason, duration, cost); whichever comes first counts it.
_OUTCOME_EVENTS = frozenset({EventName.CALL_ENDED, EventName.CALL_ANALYZED})
UNKNOWN_AGENT = "unknown"


def counter_of(event: EventName) -> str:
    """The running count a lifecycle event adds to: its first word in the plural (`calls_started`)."""
    first, _, rest = event.partition("_")
    return f"{first}s_{rest}"


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


class SubjectFields(msgspec.Struct):
    """The fields read from the event's call (or chat) object."""

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
    # The call's own clock (unix ms): how old a delivery's call is, whatever its received_at says.
    start_timestamp: float | None = None
    end_timestamp: float | None = None


class Body(msgspec.Struct):
    event: str = ""
    call: SubjectFields | None = None
    chat: SubjectFields | None = None


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
    last_at: int = 0  # the latest `received_at` of any of its deliveries (0: written by an older version)
    late: bool = False  # first seen after its state could have been dropped: counted in late_events only


# Once either is counted the call (or chat) is over: only retries can follow.
_DONE = EVENT_BIT[EventName.CALL_ANALYZED] | EVENT_BIT[EventName.CHAT_ANALYZED]


def is_done(state: CallState) -> bool:
    """The call's analysis was counted: what is left to come is retries."""
    return bool(state.seen & _DONE)


def call_time(body: Body) -> int | None:
    """The latest of the call's (or chat's) own start and end timestamps; None when it has neither."""
    subject = body.call or body.chat
    if subject is None:
        return None
    times = [t for t in (subject.start_timestamp, subject.end_timestamp) if t is not None]
    return int(max(times)) if times else None


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
    effects = Effects()
    raised: list[Raised] = []
    kind = _subject_kind(event, body)
    subject = body.chat if kind is Subject.CHAT else body.call
    if subject is None:
        subject = body.call or body.chat or SubjectFields()
    if state is None:
        state = CallState(agent=subject.agent_id or UNKNOWN_AGENT)
        effects.inc(f"{kind.value}s")  # distinct calls, distinct chats
    elif state.agent == UNKNOWN_AGENT and subject.agent_id:
        state.agent = subject.agent_id
    if event == EventName.TRANSCRIPT_UPDATED:
        _transcript(state, subject, effects)
    elif event in EVENT_BIT:
        _lifecycle(state, EventName(event), subject, effects, raised, rules)
    else:  # an event type the catalogue does not know: counted, nothing else
        effects.inc(f"event:{event or UNKNOWN}")
    return state, effects, raised


def _subject_kind(event: str, body: Body) -> Subject:
    """What the event is about: from the catalogue, or for an unknown type from the body."""
    kind = subject_of(event)
    if kind is not None:
        return kind
    return Subject.CHAT if body.call is None and body.chat is not None else Subject.CALL


def _transcript(state: CallState, subject: SubjectFields, effects: Effects) -> None:
    raw = subject.transcript
    length = 0 if bytes(raw) == b"null" else len(raw)
    if length > state.transcript_len:  # a repeat of a snapshot already counted is not news
        state.transcript_len = length
        effects.inc(f"event:{EventName.TRANSCRIPT_UPDATED}")


def _lifecycle(
    state: CallState,
    event: EventName,
    subject: SubjectFields,
    effects: Effects,
    raised: list[Raised],
    rules: AlertConfig,
) -> None:
    """Count a lifecycle event once per call, and what it tells about the call."""
    bit = EVENT_BIT[event]
    if state.seen & bit:
        return
    state.seen |= bit
    effects.inc(f"event:{event}")
    effects.inc(counter_of(event))
    if event == EventName.CALL_STARTED:
        if not state.outcome:  # reordered: the call ended already
            effects.inc("active_calls")
    elif event in _OUTCOME_EVENTS:
        if not state.outcome:
            _outcome(state, subject, effects, raised, rules)
        if event == EventName.CALL_ANALYZED:
            _analysis(state, subject, effects, raised, rules)
    elif event == EventName.TRANSFER_CANCELLED and rules.transfer_cancelled.enabled:
        _raise(state, "transfer_cancelled", "transfer cancelled", raised)
    elif event == EventName.CHAT_ANALYZED:
        analysis = subject.chat_analysis
        if analysis is not None and analysis.chat_successful is True:
            effects.inc("chats_successful")


def _raise(state: CallState, rule: str, reason: str, raised: list[Raised]) -> None:
    bit = RULE_BIT[rule]
    if not state.alerts & bit:
        state.alerts |= bit
        raised.append(Raised(rule, reason))


def _outcome(
    state: CallState, subject: SubjectFields, effects: Effects, raised: list[Raised], rules: AlertConfig
) -> None:
    """Count the call's ending once, from whichever of call_ended / call_analyzed came first."""
    state.outcome = True
    if state.seen & EVENT_BIT[EventName.CALL_STARTED]:
        effects.inc("active_calls", -1)
    effects.inc("calls_finished")
    reason = subject.disconnection_reason or "unknown"
    effects.inc(f"reason:{reason}")
    failed_dial = rules.is_failed_dial(reason)
    not_connected = failed_dial or subject.call_status == "not_connected"
    state.connected = not not_connected
    effects.inc("not_connected" if not_connected else "connected")
    if not_connected or rules.is_error(reason):
        effects.inc("failed")
    _measures(subject, effects, connected=state.connected)
    if not_connected:
        if rules.failed_dial.enabled:
            _raise(state, "failed_dial", reason, raised)
    elif rules.is_error(reason) and rules.error.enabled:
        _raise(state, "error", reason, raised)


def _measures(subject: SubjectFields, effects: Effects, *, connected: bool) -> None:
    """Duration (of connected calls only), cost and the call's own e2e latency."""
    if connected and subject.duration_ms is not None:
        effects.durations.append(float(subject.duration_ms))
    cost = subject.call_cost.combined_cost if subject.call_cost is not None else None
    if cost:
        effects.cost += cost
    latency = subject.latency
    if latency is not None and latency.e2e is not None and latency.e2e.p50 is not None:
        effects.latencies.append(latency.e2e.p50)


def _analysis(
    state: CallState, subject: SubjectFields, effects: Effects, raised: list[Raised], rules: AlertConfig
) -> None:
    analysis = subject.call_analysis
    if analysis is None:
        return
    if analysis.in_voicemail:
        state.voicemail = True
    if analysis.call_successful is True:
        effects.inc("calls_successful")
    elif analysis.call_successful is False:
        effects.inc("calls_unsuccessful")
        rule = rules.unsuccessful
        if rule.enabled and state.connected and not (rule.ignore_voicemail and state.voicemail):
            _raise(state, "unsuccessful", "call_successful is false", raised)
    sentiment = analysis.user_sentiment
    if sentiment:
        effects.inc(f"sentiment:{sentiment}")
        if rules.negative_sentiment.enabled and sentiment in rules.negative_sentiment.sentiments:
            _raise(state, "negative_sentiment", f"user sentiment {sentiment}", raised)
