"""Resident memory of a stack's processes over a long run, by role, and how much each grew.

A role ("worker A", "gateway #1") is played by one process at a time; a restart starts a new
incarnation with its own pid. Growth is judged per incarnation, from a baseline taken once the run
and the incarnation are both past the warm-up, to its last sample: a restarted process starts small
and grows into its working set, which is not a leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


def rss_mb(pid: int) -> float | None:
    """VmRSS of one process (not its children), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Sample:
    at: float  # seconds after the start of the run
    pid: int
    mb: float


@dataclass
class Incarnation:
    pid: int
    started: float  # seconds after the start of the run
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Growth:
    role: str
    pid: int
    baseline_at: float | None = None
    baseline_mb: float | None = None
    end_at: float | None = None
    end_mb: float | None = None
    peak_mb: float | None = None
    why_not: str = ""  # when no growth can be judged

    @property
    def percent(self) -> float | None:
        if self.baseline_mb is None or self.end_mb is None or not self.baseline_mb:
            return None
        return 100 * (self.end_mb - self.baseline_mb) / self.baseline_mb


@dataclass
class RssLog:
    """Samples per role; `sample(at, {role: pid})` once a minute, `growth(warmup)` at the end."""

    roles: dict[str, list[Incarnation]] = field(default_factory=dict)

    def sample(self, at: float, pids: dict[str, int | None]) -> None:
        for role, pid in pids.items():
            if pid is None:
                continue
            mb = rss_mb(pid)
            if mb is not None:
                self.add(role, pid, at, mb)

    def add(self, role: str, pid: int, at: float, mb: float) -> None:
        self.started(role, pid, at)
        self.roles[role][-1].samples.append(Sample(at, pid, mb))

    def started(self, role: str, pid: int, at: float) -> None:
        """Say when a process began (a sample may come only later)."""
        lives = self.roles.setdefault(role, [])
        if not lives or lives[-1].pid != pid:
            lives.append(Incarnation(pid, at))

    def at(self, role: str, when: float, tolerance: float) -> Sample | None:
        """The role's sample nearest `when`, within `tolerance` seconds."""
        best: Sample | None = None
        for life in self.roles.get(role, []):
            for s in life.samples:
                if abs(s.at - when) <= tolerance and (best is None or abs(s.at - when) < abs(best.at - when)):
                    best = s
        return best

    def growth(self, warmup: float) -> list[Growth]:
        """Per incarnation: from its first sample past max(warm-up of the run, warm-up of its own
        life) to its last sample."""
        out = []
        for role, lives in self.roles.items():
            for i, life in enumerate(lives):
                g = Growth(role, life.pid)
                after = [s for s in life.samples if s.at >= max(warmup, life.started + warmup)]
                if len(after) < 2:
                    last = life.samples[-1].at if life.samples else life.started
                    ended = lives[i + 1].started if i + 1 < len(lives) else last
                    g.why_not = f"lived {ended - life.started:.0f} s: too short past the warm-up"
                else:
                    g.baseline_at, g.baseline_mb = after[0].at, after[0].mb
                    g.end_at, g.end_mb = after[-1].at, after[-1].mb
                    g.peak_mb = max(s.mb for s in after)
                out.append(g)
        return out
