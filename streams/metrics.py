"""Mergeable call metrics: counters, total cost and log-bucket histograms, and their summary.

An `Agg` holds the numbers of one scope (one agent, or every agent: `ALL`) in one partition, either
as a running total or for one 1-minute window. Aggs of different partitions (or workers) add up
exactly, which is how the group-wide view is built: counters and histogram buckets are sums.
Percentiles come from the histogram, so they are accurate to the bucket width (2 %).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

ALL = "*"  # the scope of every agent together
WINDOW_MS = 60_000
RETENTION_MS = 24 * 3600 * 1000

# Histogram buckets grow by 2 %: a percentile read back from them is within 2 % of the exact value.
_GROWTH = 1.02
_LOG_GROWTH = math.log(_GROWTH)


def bucket_of(value: float) -> int:
    """The histogram bucket of a positive value; 0 and below share bucket -1."""
    if value <= 0:
        return -1
    return math.floor(math.log(value) / _LOG_GROWTH)


def bucket_value(bucket: int) -> float:
    """The value a bucket stands for: the geometric middle of its bounds."""
    if bucket < 0:
        return 0.0
    return _GROWTH ** (bucket + 0.5)


def window_start(ts_ms: int) -> int:
    return ts_ms - ts_ms % WINDOW_MS


class Agg(msgspec.Struct, omit_defaults=True):
    """Counters (`calls_started`, `reason:<r>`, `event:<name>` ...), cost and two histograms."""

    c: dict[str, int] = msgspec.field(default_factory=dict)
    cost: float = 0.0
    dur: dict[int, int] = msgspec.field(default_factory=dict)  # call duration, ms
    lat: dict[int, int] = msgspec.field(default_factory=dict)  # the call's own e2e latency p50, ms

    def add(self, other: Agg) -> None:
        c = self.c
        for k, v in other.c.items():
            c[k] = c.get(k, 0) + v
        self.cost += other.cost
        for h_self, h_other in ((self.dur, other.dur), (self.lat, other.lat)):
            for b, n in h_other.items():
                h_self[b] = h_self.get(b, 0) + n


class Effects(msgspec.Struct):
    """What one event changes in the metrics of its agent (and of `ALL`)."""

    counts: dict[str, int] = msgspec.field(default_factory=dict)
    cost: float = 0.0
    durations: list[float] = msgspec.field(default_factory=list)
    latencies: list[float] = msgspec.field(default_factory=list)

    def inc(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def empty(self) -> bool:
        return not (self.counts or self.cost or self.durations or self.latencies)

    def apply_to(self, agg: Agg) -> None:
        c = agg.c
        for k, v in self.counts.items():
            c[k] = c.get(k, 0) + v
        agg.cost += self.cost
        for d in self.durations:
            b = bucket_of(d)
            agg.dur[b] = agg.dur.get(b, 0) + 1
        for lv in self.latencies:
            b = bucket_of(lv)
            agg.lat[b] = agg.lat.get(b, 0) + 1


def quantile(hist: Mapping[int, int], q: float) -> float | None:
    """Nearest-rank quantile (rank = ceil(q * n)) of a bucket histogram; None when empty."""
    n = sum(hist.values())
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return round(bucket_value(b), 1)
    return None  # pragma: no cover (the loop always reaches rank)


def exact_quantile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank quantile of raw values: what `quantile` approximates to within 2 %."""
    xs = sorted(values)
    if not xs:
        return None
    return xs[max(1, math.ceil(q * len(xs))) - 1]


def merge(aggs: Iterable[Agg]) -> Agg:
    out = Agg()
    for a in aggs:
        out.add(a)
    return out


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _prefixed(c: Mapping[str, int], prefix: str) -> dict[str, int]:
    n = len(prefix)
    return {k[n:]: v for k, v in sorted(c.items()) if k.startswith(prefix) and v}


def summarize(agg: Agg) -> dict[str, Any]:
    """The numbers the dashboard, the JSON API and Prometheus show for one scope."""
    c = agg.c
    g = c.get
    finished = g("calls_finished", 0)
    analyzed_ok, analyzed_bad = g("calls_successful", 0), g("calls_unsuccessful", 0)
    return {
        "calls": g("calls", 0),
        "calls_started": g("calls_started", 0),
        "calls_ended": g("calls_ended", 0),
        "calls_analyzed": g("calls_analyzed", 0),
        "calls_finished": finished,
        "active_calls": g("active_calls", 0),
        "connected": g("connected", 0),
        "not_connected": g("not_connected", 0),
        "failed": g("failed", 0),
        "failure_rate": _ratio(g("failed", 0), finished),
        "disconnection_reasons": _prefixed(c, "reason:"),
        "calls_successful": analyzed_ok,
        "calls_unsuccessful": analyzed_bad,
        "success_rate": _ratio(analyzed_ok, analyzed_ok + analyzed_bad),
        "sentiment": _prefixed(c, "sentiment:"),
        "transfers_started": g("transfers_started", 0),
        "transfers_bridged": g("transfers_bridged", 0),
        "transfers_cancelled": g("transfers_cancelled", 0),
        "cost_total": round(agg.cost, 4),
        "duration_p50_ms": quantile(agg.dur, 0.5),
        "duration_p95_ms": quantile(agg.dur, 0.95),
        "e2e_latency_p50_ms": quantile(agg.lat, 0.5),
        "chats_started": g("chats_started", 0),
        "chats_ended": g("chats_ended", 0),
        "chats_analyzed": g("chats_analyzed", 0),
        "chats_successful": g("chats_successful", 0),
        "events": _prefixed(c, "event:"),
    }
