"""A sender process: planned deliveries at their due time, with Retell's habits, measured honestly.

Like Retell's sender it fires each call's events in order without waiting on the previous one,
gives each delivery 10 s, retries a failed one up to 3 times, and sends what the plan duplicated.
It only writes requests that were built and signed in the parent process, so that the CPU spent on
making traffic never delays reading an answer: the latency it records is the server's.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from callstream.sim.http1 import Pool, Target
from callstream.sim.record import Acknowledged, body_digest
from callstream.sim.result import SimulationResult
from callstream.sim.traffic import Delivery
from kernel.catalogue import Subject, subject_of
from kernel.signature import sign

SENDER_TIMEOUT_S = 10.0
SENDER_RETRIES = 3
# A request signed longer ago than this is signed again before it goes out (the gateway allows 5 min).
RESIGN_AFTER_MS = 60_000
PROGRESS_EVERY_S = 0.2
# Batches a sender holds besides the one being sent: the feeder stays this far ahead and no more.
AHEAD_BATCHES = 4

Batch = list[Delivery] | None  # None: no more deliveries


@dataclass(frozen=True)
class Job:
    """What a sender process is told first."""

    target: Target
    key: str | None
    concurrency: int
    duration: float | None
    record: bool = False  # report every acknowledged delivery (`callstream simulate --record`)


@dataclass(frozen=True)
class Pipes:
    """A sender's three pipes to the parent (multiprocessing connections over plain file descriptors)."""

    control: Connection  # parent -> sender: the job, then the run's start (time.monotonic(), one clock)
    inbox: Connection  # parent -> sender: batches of deliveries, then None
    outbox: Connection  # sender -> parent: ("ready",), ("progress", n), ("acked", [line]), ("result", SimulationResult)


def _retryable(status: int) -> bool:
    """Retell retries what was not answered 2xx, except a refusal (4xx other than timeout and throttling)."""
    return not 200 <= status < 300 and (status in (0, 408, 429) or status >= 500)


def _backoff(retry: int) -> float:
    return min(2.0, 0.2 * 2.0**retry)


class Sender:
    def __init__(self, job: Job, pipes: Pipes) -> None:
        self.job, self.pipes = job, pipes
        self.res = SimulationResult()
        self.pool = Pool(job.target, SENDER_TIMEOUT_S)
        self.slots = asyncio.Semaphore(job.concurrency)
        self.tasks: set[asyncio.Task[None]] = set()
        self.start = 0.0
        self.written = 0  # requests not yet reported to the parent
        self.acked: list[str] = []  # record lines not yet sent to the parent

    async def run(self) -> SimulationResult:
        inbox = _relay(self.pipes.inbox)
        self.pipes.outbox.send(("ready",))
        self.start = await asyncio.to_thread(self.pipes.control.recv)
        reporter = asyncio.create_task(self._report())
        try:
            await self._pace(inbox)
            if self.tasks:
                await asyncio.gather(*self.tasks)
        finally:
            reporter.cancel()
            self._flush_progress()
            self.pool.close()
        self.res.seconds = time.monotonic() - self.start
        return self.res

    async def _pace(self, inbox: asyncio.Queue[Batch]) -> None:
        """Start every delivery at its due time (or as soon as a slot is free, when late)."""
        deadline = self.start + self.job.duration if self.job.duration is not None else float("inf")
        while (batch := await inbox.get()) is not None:
            for d in batch:
                wait = self.start + d.due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if time.monotonic() >= deadline:
                    self.res.unsent += 1
                    continue
                await self.slots.acquire()
                task = asyncio.create_task(self._deliver(d))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _deliver(self, d: Delivery) -> None:
        self._plan(d)
        request = d.request
        if int(time.time() * 1000) - d.signed_ms > RESIGN_AFTER_MS:
            request = self._resigned(d)
        try:
            status = await self._attempt(request, d.due)
        finally:
            self.slots.release()
        for retry in range(SENDER_RETRIES):
            if not _retryable(status):
                break
            await asyncio.sleep(_backoff(retry))
            self.res.retries += 1
            async with self.slots:
                status = await self._attempt(self._resigned(d), None)
        if 200 <= status < 300:
            if not d.duplicate:
                self.res.accepted_by_event[d.event] += 1
            if self.job.record:
                at = int(time.time() * 1000)
                self.acked.append(Acknowledged(at, d.event, d.key, body_digest(d.body)).line())
        else:
            self.res.failed += 1

    def _plan(self, d: Delivery) -> None:
        res = self.res
        res.body_bytes += len(d.request) - d.body_at
        if d.duplicate:
            res.duplicates += 1
            return
        res.events += 1
        res.by_event[d.event] += 1
        (res.chats if subject_of(d.event) is Subject.CHAT else res.calls).add(d.key)

    async def _attempt(self, request: bytes, due: float | None) -> int:
        """One request; `due` is the planned start of a first delivery (None for a retry)."""
        answer = await self.pool.post(request)
        res = self.res
        res.sent += 1
        self.written += 1
        res.statuses[answer.status] += 1
        if answer.seconds is not None:
            res.latencies_ms.append(answer.seconds * 1000)
        if due is not None:
            started = (answer.written or time.monotonic()) - self.start
            res.lags_ms.append(max(0.0, started - due) * 1000)
            res.last_start = max(res.last_start, started)
        return answer.status

    def _resigned(self, d: Delivery) -> bytes:
        body = d.body
        return self.job.target.request(body, sign(body, self.job.key) if self.job.key else None)[0]

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            self._flush_progress()

    def _flush_progress(self) -> None:
        if self.written:
            self.pipes.outbox.send(("progress", self.written))
        self.written = 0
        if self.acked:
            self.pipes.outbox.send(("acked", self.acked))
            self.acked = []


def _relay(inbox: Connection) -> asyncio.Queue[Batch]:
    """The parent's batches, moved by a thread from the pipe onto the event loop, a few at most."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[Batch] = asyncio.Queue(AHEAD_BATCHES)

    def pump() -> None:
        while True:
            batch: Batch = inbox.recv()
            asyncio.run_coroutine_threadsafe(out.put(batch), loop).result()
            if batch is None:
                return

    threading.Thread(target=pump, name="sender-inbox", daemon=True).start()
    return out


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # no uvloop on this platform: the standard loop does the same, slower
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def main(argv: list[str]) -> None:
    """`python -m callstream.sim.sender CONTROL INBOX OUTBOX` (file descriptors the parent passed).

    The parent stops a sender on Ctrl-C, so a sender ignores SIGINT; it ends when its pipes close.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control, inbox, outbox = (int(fd) for fd in argv)
    pipes = Pipes(
        Connection(control, writable=False), Connection(inbox, writable=False), Connection(outbox, readable=False)
    )
    job: Job = pipes.control.recv()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        res = runner.run(Sender(job, pipes).run())
    pipes.outbox.send(("result", res))


if __name__ == "__main__":
    main(sys.argv[1:])
