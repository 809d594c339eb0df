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
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

from callstream.sim import sender
from callstream.sim.feeder import INBOX_BATCHES, Feeder
from callstream.sim.http1 import Target
from callstream.sim.plan import SimulationPlan, fresh_seed
from callstream.sim.result import SimulationResult
from callstream.sim.sender import SENDER_RETRIES, SENDER_TIMEOUT_S, Batch, Job, Links
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


class SimulationError(CallstreamError):
    """A sender process died or never started."""


@dataclass
class _Senders:
    """The sender processes and what they share with this one."""

    plan: SimulationPlan
    links: list[Links]
    procs: list[multiprocessing.process.BaseProcess]

    @classmethod
    def spawn(cls, plan: SimulationPlan, target: Target, key: str | None) -> _Senders:
        # spawn, not fork: the caller may run threads (Kafka clients, a web server) that fork would copy.
        ctx = multiprocessing.get_context("spawn")
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        start, progress = ctx.Value("d", 0.0), ctx.Value("q", 0)
        links = [Links(ctx.Queue(INBOX_BATCHES), ready, results, go, start, progress) for _ in range(plan.processes)]
        procs: list[multiprocessing.process.BaseProcess] = []
        for i, link in enumerate(links):
            job = Job(i, target, key, plan.concurrency_per_process, plan.duration)
            p = ctx.Process(target=sender.main, args=(job, link), name=f"simulate-sender-{i}", daemon=True)
            p.start()
            procs.append(p)
        return cls(plan, links, procs)

    @property
    def inboxes(self) -> list[multiprocessing.queues.Queue[Batch]]:
        return [link.inbox for link in self.links]

    def check(self, feeder: Feeder, done: set[int]) -> None:
        if feeder.error is not None:
            raise feeder.error
        for i, p in enumerate(self.procs):
            if i not in done and p.exitcode not in (None, 0):
                raise SimulationError(f"sender process {i} exited with code {p.exitcode}")

    async def ready(self, feeder: Feeder) -> None:
        """Wait until every sender runs and has work: the run's clock starts after that."""
        ready, deadline = 0, time.monotonic() + START_TIMEOUT_S
        while ready < len(self.procs) or not feeder.primed.is_set():
            self.check(feeder, set())
            if time.monotonic() > deadline:
                raise SimulationError(f"the sender processes did not start in {START_TIMEOUT_S:.0f}s")
            try:
                self.links[0].ready.get_nowait()
                ready += 1
            except queue.Empty:
                await asyncio.sleep(POLL_S)

    def go(self) -> float:
        link = self.links[0]
        link.start.value = time.monotonic()
        link.go.set()
        return link.start.value

    async def collect(self, feeder: Feeder, progress: Callable[[int], None] | None) -> SimulationResult:
        """Wait for every sender's tally, stopping the feeder when the duration is over."""
        res = SimulationResult(rate=self.plan.rate, seed=self.plan.seed, processes=self.plan.processes)
        start, done, shown = self.links[0].start.value, set[int](), 0
        while len(done) < len(self.procs):
            self.check(feeder, done)
            if self.plan.duration is not None and time.monotonic() >= start + self.plan.duration:
                feeder.stop.set()
            try:
                i, part = self.links[0].results.get_nowait()
                res.add(part)
                done.add(i)
            except queue.Empty:
                await asyncio.sleep(POLL_S)
            shown = _show(self.links[0].progress.value, shown, progress)
        return res

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
        for link in self.links:
            link.inbox.cancel_join_thread()  # never wait at exit to hand batches to a sender that is gone


def _show(written: int, shown: int, progress: Callable[[int], None] | None) -> int:
    if progress is not None and written > shown:
        progress(written - shown)
    return written


async def run(
    url: str, key: str | None, plan: SimulationPlan | None = None, progress: Callable[[int], None] | None = None
) -> SimulationResult:
    """Send `plan`'s traffic to `url`, signed with `key` (unsigned when None); `progress(n)`: n more requests."""
    plan = plan or SimulationPlan()
    target = Target.from_url(url)
    senders = _Senders.spawn(plan, target, key)
    feeder = Feeder(plan, target, key, senders.inboxes)
    try:
        feeder.start()
        await senders.ready(feeder)
        senders.go()
        return await senders.collect(feeder, progress)
    finally:
        feeder.abandon.set()
        senders.close()
