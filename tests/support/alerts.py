"""What a run's alerts should be, and what reached the alerts topic and a webhook receiver."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from kernel.catalogue import EventName, Header, topic
from streams.alertrules import RATE_RULE, load_config
from streams.processor import DictStore, EventMessage, Processor
from tests.support.kafka import consume_all, topic_counts

_EVENT_TOPICS = [*EventName, "unknown"]


def expected_call_alerts(bootstrap: str, prefix: str, rules: Path | None = None) -> set[str]:
    """The ids of the per-call alerts the events on the prefix's topics raise: what one worker that
    never crashed raises, reading them all (the worker's own processor over a dict)."""
    counts = topic_counts(bootstrap, prefix)
    proc = Processor(DictStore(), load_config(rules))
    ids: set[str] = set()
    for name in _EVENT_TOPICS:
        if not counts.get(name):
            continue
        messages = consume_all(bootstrap, topic(prefix, name), counts[name])
        batch = []
        for m in messages:
            headers = dict(m.headers() or [])
            at = int(headers.get(Header.RECEIVED_AT, b"0"))
            batch.append(EventMessage(m.partition() or 0, name, m.key() or b"", m.value() or b"", at))
        ids |= {a.id for a in proc.process(batch)}
    return ids


def topic_alert_ids(bootstrap: str, prefix: str) -> Counter[str]:
    """Every alert on `<prefix>.alerts`, by id (a failure-rate alert by its agent), with how often."""
    name = topic(prefix, "alerts")
    n = topic_counts(bootstrap, prefix).get("alerts", 0)
    return Counter(_id(json.loads(m.value() or b"{}")) for m in consume_all(bootstrap, name, n))


def received_alert_ids(bodies: list[Any]) -> Counter[str]:
    """The alerts a webhook receiver got, by id (a failure-rate alert by its agent), with how often."""
    return Counter(_id(b["alert"]) for b in bodies)


def _id(alert: dict[str, Any]) -> str:
    return f"{RATE_RULE}:{alert['agent_id']}" if alert["rule"] == RATE_RULE else str(alert["id"])


def call_alerts(ids: Counter[str]) -> Counter[str]:
    return Counter({k: n for k, n in ids.items() if not k.startswith(f"{RATE_RULE}:")})
