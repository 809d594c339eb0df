"""A quixstreams application computing the worker's per-agent call totals, as a peer in `make bench-streams`.

It reads every event topic of a prefix from the start (one StreamingDataFrame, the topics
concatenated, so one call's events share one state store), decodes each body with the worker's
decoder (with --json: quixstreams' own JSON deserializer), keeps per call which lifecycle events
were counted and whether its outcome was (RocksDB state with its changelog topic, quixstreams'
defaults), and adds to per-agent calls_started / calls_ended / calls_analyzed / failed /
calls_successful held in memory. "failed" follows the worker: a call that did not connect or
ended on an error, counted once from whichever of call_ended / call_analyzed comes first.

Stops after `--messages` messages and prints one JSON line: messages/s and CPU µs per message from
the first message to the last, and the totals.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from functools import reduce
from typing import Any, NamedTuple

from quixstreams import Application, State

from kernel.catalogue import EVENT_NAMES, EventName, topic
from streams.alertrules import load_config
from streams.calls import SubjectFields, decode_body

_BIT: dict[str, int] = {EventName.CALL_STARTED: 1, EventName.CALL_ENDED: 2, EventName.CALL_ANALYZED: 4}
_COUNTER = {1: "calls_started", 2: "calls_ended", 4: "calls_analyzed"}
_NO_CALL = SubjectFields()


class _Call(NamedTuple):
    """The call fields the totals need."""

    agent_id: str | None
    reason: str | None
    status: str | None
    successful: bool | None

    @classmethod
    def of(cls, call: SubjectFields) -> _Call:
        analysis = call.call_analysis
        ok = analysis.call_successful if analysis is not None else None
        return cls(call.agent_id, call.disconnection_reason, call.call_status, ok)

    @classmethod
    def of_dict(cls, call: dict[str, Any]) -> _Call:
        ok = (call.get("call_analysis") or {}).get("call_successful")
        return cls(call.get("agent_id"), call.get("disconnection_reason"), call.get("call_status"), ok)


class Counting:
    """The per-message function and what it counted."""

    def __init__(self, app: Application, messages: int) -> None:
        self.app = app
        self.messages = messages
        self.rules = load_config()
        self.seen = 0
        self.t0 = self.t1 = self.c0 = self.c1 = 0.0
        self.totals: defaultdict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))

    def __call__(self, value: bytes | dict[str, Any], state: State[str, Any]) -> None:
        if isinstance(value, bytes):
            body = decode_body(value)
            bit = _BIT.get(body.event)
            if bit is not None:
                self._count(bit, _Call.of(body.call or _NO_CALL), state)
        else:  # --json: quixstreams' own JSON deserializer gave the whole body as a dict
            bit = _BIT.get(value.get("event") or "")
            if bit is not None:
                self._count(bit, _Call.of_dict(value.get("call") or {}), state)
        self.seen += 1
        if self.seen == 1:
            self.t0, self.c0 = time.perf_counter(), time.process_time()
        elif self.seen >= self.messages:
            self.t1, self.c1 = time.perf_counter(), time.process_time()
            self.app.stop()

    def _count(self, bit: int, call: _Call, state: State[str, Any]) -> None:
        saved = state.get("s")
        seen, outcome, agent = saved if saved else (0, 0, call.agent_id or "unknown")
        if seen & bit:
            return  # a redelivery
        seen |= bit
        totals = self.totals[agent]
        totals[_COUNTER[bit]] += 1
        if bit != 1 and not outcome:
            outcome = 1
            reason = call.reason or "unknown"
            rules = self.rules
            if rules.is_failed_dial(reason) or call.status == "not_connected" or rules.is_error(reason):
                totals["failed"] += 1
        if bit == 4 and call.successful is True:
            totals["calls_successful"] += 1
        state.set("s", [seen, outcome, agent])

    def result(self) -> dict[str, object]:
        n = self.seen - 1  # the first message started the clock
        dt = self.t1 - self.t0
        return {
            "messages": self.seen,
            "rate": n / dt if dt > 0 else 0.0,
            "cpu_us": 1e6 * (self.c1 - self.c0) / max(1, n),
            "totals": {a: dict(t) for a, t in self.totals.items()},
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--group", required=True, help="a fresh consumer group: the app reads from the start")
    ap.add_argument("--messages", type=int, required=True, help="stop after this many messages")
    ap.add_argument("--poll-timeout", type=float, default=1.0, help="quixstreams' consumer_poll_timeout")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--json", action="store_true", help="quixstreams' JSON deserializer instead of bytes + decode_body")
    ap.add_argument(
        "--consumer-config", action="append", default=[], metavar="KEY=VALUE", help="extra librdkafka consumer setting"
    )
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.consumer_config)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        consumer_poll_timeout=args.poll_timeout,
        state_dir=args.state_dir,
        consumer_extra_config=extra,
        loglevel=logging.WARNING,
    )
    frames = [
        app.dataframe(
            app.topic(
                topic(args.prefix, e), value_deserializer="json" if args.json else "bytes", key_deserializer="bytes"
            )
        )
        for e in EVENT_NAMES
    ]
    merged = reduce(lambda a, b: a.concat(b), frames)
    # quixstreams names a merged stream's state changelog after all its topics, which for eleven
    # topics passes Kafka's 255 characters: give the merged stream a short id, as its clone allows.
    calls = merged.__dataframe_clone__(stream=merged.stream, stream_id="calls")
    counting = Counting(app, args.messages)
    calls.update(counting, stateful=True)
    app.run()
    print(json.dumps(counting.result()))


if __name__ == "__main__":
    main()
