"""`callstream simulate`: signed webhook traffic against a gateway, with the sender's real habits.

Like Retell's sender it fires each call's events in order without waiting on the previous one,
gives each delivery 10 s, retries a failed one up to 3 times, and sometimes delivers the same
event twice. Calls overlap, so events of many calls interleave, and a small share of a call's
neighbouring events are swapped (reordering on the way).

This process makes and signs the deliveries on a thread; sender processes only write them at
their due time and read the answers, so the latency they report is the server's response time and
the lag of their schedule is reported on its own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from callstream.sim.feeder import Feeder
from callstream.sim.http1 import Target
from callstream.sim.plan import SimulationPlan, fresh_seed
from callstream.sim.result import SimulationResult
from callstream.sim.sender import SENDER_RETRIES, SENDER_TIMEOUT_S, Job, Pipes
from callstream.sim.traffic import schedule
from kernel.errors import CallstreamError

__all__ = [
    "SENDER_RETRIES",
    "SENDER_TIMEOUT_S",
    "SimulationPlan",
    "SimulationResult",
    "fresh_seed",
    "run",
    "schedule",
]

START_TIMEOUT_S = 60.0
POLL_S = 0.05

Record = Callable[[list[str]], None]


class SimulationError(CallstreamError):
    """A sender process died or never started."""


@dataclass
class _Child:
    """A sender process and this end of its pipes."""

    proc: subprocess.Popen[bytes]
    pipes: Pipes
    result: SimulationResult | None = None
    ready: bool = False

    @classmethod
    def start(cls, job: Job) -> _Child:
        # A plain `python -m` child, not multiprocessing's: no fork of a caller's threads (Kafka
        # clients, web servers), and no re-import of the caller's __main__.
        ends = [os.pipe() for _ in range(3)]  # control and inbox (to the child), outbox (from it)
        theirs = (ends[0][0], ends[1][0], ends[2][1])
        proc = subprocess.Popen(
            [sys.executable, "-m", "callstream.sim.sender", *map(str, theirs)],
            pass_fds=theirs,
            stdin=subprocess.DEVNULL,
        )
        for fd in theirs:
            os.close(fd)
        pipes = Pipes(
            Connection(ends[0][1], readable=False),
            Connection(ends[1][1], readable=False),
            Connection(ends[2][0], writable=False),
        )
        pipes.control.send(job)
        return cls(proc, pipes)

    def read(self, progress: Callable[[int], None] | None, record: Record | None) -> None:
        """Take in what the sender said since the last look."""
        while self.result is None and self.pipes.outbox.poll():
            kind, *rest = self.pipes.outbox.recv()
            if kind == "ready":
                self.ready = True
            elif kind == "progress" and progress is not None:
                progress(rest[0])
            elif kind == "acked" and record is not None:
                record(rest[0])
            elif kind == "result":
                self.result = rest[0]

    def check(self, index: int) -> None:
        if self.result is None and self.proc.poll() is not None:
            raise SimulationError(f"sender process {index} exited with code {self.proc.returncode}")

    def end(self) -> None:
        """Stop the process (when it still runs) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        for conn in (self.pipes.control, self.pipes.inbox, self.pipes.outbox):
            conn.close()


@dataclass
class _Senders:
    """The sender processes of one run."""

    plan: SimulationPlan
    record: Record | None = None
    children: list[_Child] = field(default_factory=list)

    def spawn(self, target: Target, key: str | None) -> None:
        job = Job(target, key, self.plan.concurrency_per_process, self.plan.duration, self.record is not None)
        for _ in range(self.plan.processes):
            self.children.append(_Child.start(job))

    def _look(self, feeder: Feeder, progress: Callable[[int], None] | None = None) -> None:
        for i, child in enumerate(self.children):
            child.read(progress, self.record)
            child.check(i)
        if feeder.error is not None:
            raise feeder.error

    async def ready(self, feeder: Feeder) -> None:
        """Wait until every sender runs and has work: the run's clock starts after that."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (all(c.ready for c in self.children) and feeder.primed.is_set()):
            self._look(feeder)
            if time.monotonic() > deadline:
                raise SimulationError(f"the sender processes did not start in {START_TIMEOUT_S:.0f}s")
            await asyncio.sleep(POLL_S)

    def go(self) -> float:
        start = time.monotonic()  # one clock for every process on this machine
        for child in self.children:
            child.pipes.control.send(start)
        return start

    async def collect(self, feeder: Feeder, start: float, progress: Callable[[int], None] | None) -> SimulationResult:
        """Wait for every sender's tally, stopping the feeder when the duration is over."""
        res = SimulationResult(rate=self.plan.rate, seed=self.plan.seed, processes=self.plan.processes)
        while True:
            self._look(feeder, progress)
            if all(c.result is not None for c in self.children):
                break
            if self.plan.duration is not None and time.monotonic() >= start + self.plan.duration:
                feeder.stop.set()
            await asyncio.sleep(POLL_S)
        for child in self.children:
            assert child.result is not None
            res.add(child.result)
        return res

    def stop(self, feeder: Feeder | None) -> None:
        """End the senders first, so that the feeder's pending write fails at once, then close the pipes."""
        for child in self.children:
            child.end()
        if feeder is not None:
            feeder.abandon.set()
            feeder.join(timeout=5)
        for child in self.children:
            child.close()


async def run(
    url: str,
    key: str | None,
    plan: SimulationPlan | None = None,
    progress: Callable[[int], None] | None = None,
    record: Record | None = None,
) -> SimulationResult:
    """Send `plan`'s traffic to `url`, signed with `key` (unsigned when None); `progress(n)`: n more requests;
    `record(lines)`: lines of the acknowledgement record (`callstream.sim.record`), as they come."""
    plan = plan or SimulationPlan()
    target = Target.from_url(url)
    senders = _Senders(plan, record)
    feeder: Feeder | None = None
    try:
        senders.spawn(target, key)
        feeder = Feeder(plan, target, key, [c.pipes.inbox for c in senders.children])
        feeder.start()
        await senders.ready(feeder)
        return await senders.collect(feeder, senders.go(), progress)
    finally:
        senders.stop(feeder)
