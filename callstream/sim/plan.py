"""What a simulation sends: every knob of `callstream simulate`, fixed before the first delivery."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field


def fresh_seed() -> int:
    """A new seed per run, so that a second run sends new calls (and says which seed repeats it)."""
    return secrets.randbelow(2**31)


@dataclass(frozen=True, slots=True)
class SimulationPlan:
    """The traffic: how much, how fast, and how faithfully to Retell's sender habits."""

    calls: int = 200  # calls and chats; ignored when `duration` is set
    rate: float = 200.0  # planned deliveries per second (0: as fast as possible)
    duration: float | None = None  # seconds to run instead of a number of calls
    concurrency: int = 64  # deliveries in flight at once, over all sender processes
    duplicate_rate: float = 0.03  # share of events delivered twice
    reorder_rate: float = 0.02  # share of calls with two neighbouring events swapped
    agents: int = 5
    seed: int = field(default_factory=fresh_seed)
    processes: int = 1  # sender processes

    def __post_init__(self) -> None:
        if self.processes < 1 or self.concurrency < 1:
            raise ValueError("processes and concurrency must be at least 1")
        if self.rate < 0 or (self.duration is not None and self.duration <= 0):
            raise ValueError("rate must be >= 0 and duration > 0")

    @property
    def interval(self) -> float:
        """Seconds between two planned deliveries (0 when as fast as possible)."""
        return 1.0 / self.rate if self.rate > 0 else 0.0

    @property
    def concurrency_per_process(self) -> int:
        return math.ceil(self.concurrency / self.processes)
