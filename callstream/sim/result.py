"""What a simulation did, and its summary: the server's latency, the asked and achieved rate, and the
sender's own scheduling lag, each on its own line, so that a slow sender never looks like a slow server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

# Achieving less than this share of the asked rate is falling behind, and the summary says so.
KEPT_RATE = 0.95


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.1f} ms"


@dataclass
class SimulationResult:
    sent: int = 0  # requests written: planned deliveries and retries
    events: int = 0  # distinct events delivered (first deliveries)
    duplicates: int = 0  # planned second deliveries of an event
    retries: int = 0
    failed: int = 0  # planned deliveries never acknowledged: refused (4xx), or no 2xx after every retry
    unsent: int = 0  # planned deliveries not started before the duration ended
    statuses: Counter[int] = field(default_factory=Counter)  # 0: no answer (connection, timeout)
    latencies_ms: list[float] = field(default_factory=list)  # the server's: request written -> response read
    lags_ms: list[float] = field(default_factory=list)  # planned deliveries: started after their due time
    calls: set[str] = field(default_factory=set)
    chats: set[str] = field(default_factory=set)
    by_event: Counter[str] = field(default_factory=Counter)
    accepted_by_event: Counter[str] = field(default_factory=Counter)  # events answered 2xx (duplicates not counted)
    body_bytes: int = 0  # of the planned deliveries
    last_start: float = 0.0  # seconds after the start when the last planned delivery started
    seconds: float = 0.0
    rate: float = 0.0  # asked planned deliveries per second (0: as fast as possible)
    seed: int | None = None
    processes: int = 1

    @property
    def planned(self) -> int:
        """Planned deliveries started: every event once, and the duplicates."""
        return self.events + self.duplicates

    @property
    def achieved_rate(self) -> float:
        """Planned deliveries started per second, over the time the plan gave them (or took)."""
        span = self.last_start + (1.0 / self.rate if self.rate > 0 else 0.0)
        if self.unsent:
            span = max(span, self.seconds)
        span = span or self.seconds
        return self.planned / span if span > 0 else 0.0

    @property
    def fell_behind(self) -> bool:
        return self.rate > 0 and (self.unsent > 0 or self.achieved_rate < KEPT_RATE * self.rate)

    def percentile(self, q: float) -> float:
        """A percentile of the server's latency, in ms."""
        return percentile(self.latencies_ms, q)

    def add(self, other: SimulationResult) -> None:
        """Count another sender process's share in."""
        for name in ("sent", "events", "duplicates", "retries", "failed", "unsent", "body_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for counter in ("statuses", "by_event", "accepted_by_event"):
            getattr(self, counter).update(getattr(other, counter))
        self.latencies_ms += other.latencies_ms
        self.lags_ms += other.lags_ms
        self.calls |= other.calls
        self.chats |= other.chats
        self.last_start = max(self.last_start, other.last_start)
        self.seconds = max(self.seconds, other.seconds)

    def summary(self) -> str:
        lines = [
            f"sent {self.sent} deliveries ({self.events} events of {len(self.calls)} calls and {len(self.chats)} "
            f"chats; {self.duplicates} duplicate deliveries, {self.retries} retries) in {self.seconds:.1f}s"
            + (f" from {self.processes} sender processes" if self.processes > 1 else "")
            + (f"; seed {self.seed}" if self.seed is not None else ""),
            f"  by status: {self._statuses()}; never acknowledged: {self.failed}",
            f"  server latency (request written to response read): {self._latency()}",
            f"  rate: {self._rate()}",
        ]
        if self.rate > 0:
            lags = self.lags_ms
            lines.append(
                f"  scheduling lag (delivery started after its planned time): p50 {_ms(percentile(lags, 0.5))}, "
                f"p95 {_ms(percentile(lags, 0.95))}, max {_ms(max(lags, default=0.0))}"
            )
        lines.append(f"  mix: {self.mix()}")
        return "\n".join(lines)

    def mix(self) -> str:
        """Which events were sent, by share, and the average body."""
        total = sum(self.by_event.values()) or 1
        shares = ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in self.by_event.most_common())
        avg = self.body_bytes / self.planned / 1024 if self.planned else 0.0
        return f"{shares or 'nothing'}; bodies {avg:.1f} KB on average"

    def _latency(self) -> str:
        if not self.latencies_ms:
            return "no answer to measure"
        return f"p50 {_ms(self.percentile(0.5))}, p95 {_ms(self.percentile(0.95))}, p99 {_ms(self.percentile(0.99))}"

    def _statuses(self) -> str:
        named = {0: "no answer"}
        return ", ".join(f"{named.get(s, s)}: {n}" for s, n in sorted(self.statuses.items())) or "none"

    def _rate(self) -> str:
        achieved = self.achieved_rate
        if self.rate <= 0:
            return f"as fast as possible: achieved {achieved:.0f}/s"
        if not self.fell_behind:
            return f"asked {self.rate:.0f}/s, achieved {achieved:.0f}/s"
        short = 100 * (1 - achieved / self.rate)
        unsent = f"; {self.unsent} planned deliveries not sent when the duration ended" if self.unsent else ""
        return (
            f"asked {self.rate:.0f}/s, achieved {achieved:.0f}/s: fell behind by {self.rate - achieved:.0f}/s "
            f"({short:.0f}% short){unsent}"
        )
