"""Mergeable call metrics: counters, total cost and log-bucket histograms, and their summary.

An `Agg` holds the numbers of one scope (one agent, or every agent: `ALL`) in one partition, either
as a running total or for one 1-minute window. Aggs of different partitions (or workers) add up
exactly, which is how the group-wide view is built: counters and histogram buckets are sums.
Percentiles come from the histogram, so they are accurate to the bucket width (2 %).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import msgspec

ALL = "*"  # the scope of every agent together
WINDOW_MS = 60_000
RETENTION_MS = 24 * 3600 * 1000
K = TypeVar("K", str, int)

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
    return float(_GROWTH ** (bucket + 0.5))


def window_start(ts_ms: int) -> int:
    return ts_ms - ts_ms % WINDOW_MS


class Agg(msgspec.Struct, omit_defaults=True):
    """Counters (`calls_started`, `reason:<r>`, `event:<name>` ...), cost and two histograms.

    The serialised field names stay short (`c`, `dur`, `lat`): they are what the changelog holds.
    """

    counts: dict[str, int] = msgspec.field(default_factory=dict, name="c")
    cost: float = 0.0
    # Histograms, bucket (see bucket_of) -> calls: call duration in ms, and the call's own e2e latency p50 in ms.
    duration_buckets: dict[int, int] = msgspec.field(default_factory=dict, name="dur")
    latency_buckets: dict[int, int] = msgspec.field(default_factory=dict, name="lat")

    def add(self, other: Agg) -> None:
        _add_counts(self.counts, other.counts)
        self.cost += other.cost
        _add_counts(self.duration_buckets, other.duration_buckets)
        _add_counts(self.latency_buckets, other.latency_buckets)


def _add_counts(target: dict[K, int], more: Mapping[K, int]) -> None:
    for key, n in more.items():
        target[key] = target.get(key, 0) + n


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
        _add_counts(agg.counts, self.counts)
        agg.cost += self.cost
        for duration in self.durations:
            bucket = bucket_of(duration)
            agg.duration_buckets[bucket] = agg.duration_buckets.get(bucket, 0) + 1
        for latency in self.latencies:
            bucket = bucket_of(latency)
            agg.latency_buckets[bucket] = agg.latency_buckets.get(bucket, 0) + 1


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


def _prefixed(counts: Mapping[str, int], prefix: str) -> dict[str, int]:
    n = len(prefix)
    return {k[n:]: v for k, v in sorted(counts.items()) if k.startswith(prefix) and v}


def summarize(agg: Agg) -> dict[str, Any]:
    """The numbers the dashboard, the JSON API and Prometheus show for one scope."""
    counts = agg.counts
    g = counts.get
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
        "disconnection_reasons": _prefixed(counts, "reason:"),
        "calls_successful": analyzed_ok,
        "calls_unsuccessful": analyzed_bad,
        "success_rate": _ratio(analyzed_ok, analyzed_ok + analyzed_bad),
        "sentiment": _prefixed(counts, "sentiment:"),
        "transfers_started": g("transfers_started", 0),
        "transfers_bridged": g("transfers_bridged", 0),
        "transfers_cancelled": g("transfers_cancelled", 0),
        "cost_total": round(agg.cost, 4),
        "duration_p50_ms": quantile(agg.duration_buckets, 0.5),
        "duration_p95_ms": quantile(agg.duration_buckets, 0.95),
        "e2e_latency_p50_ms": quantile(agg.latency_buckets, 0.5),
        "chats_started": g("chats_started", 0),
        "chats_ended": g("chats_ended", 0),
        "chats_analyzed": g("chats_analyzed", 0),
        "chats_successful": g("chats_successful", 0),
        "events": _prefixed(counts, "event:"),
        "late_events": g("late_events", 0),
    }
