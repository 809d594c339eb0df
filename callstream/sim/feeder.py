"""The parent's feeding thread: makes the plan's deliveries and hands them to the sender processes.

A call's deliveries all go to one sender, so they leave in order. A sender takes a few batches
ahead and the pipe blocks beyond that, so the feeder stays a little ahead of the schedule and no
more (signatures stay fresh, memory flat).
"""

from __future__ import annotations

import threading
import zlib
from multiprocessing.connection import Connection

from callstream.sim.http1 import Target
from callstream.sim.plan import SimulationPlan
from callstream.sim.sender import Batch
from callstream.sim.traffic import Delivery, deliveries

BATCH = 64  # deliveries per message to a sender


class Feeder(threading.Thread):
    def __init__(self, plan: SimulationPlan, target: Target, key: str | None, inboxes: list[Connection]) -> None:
        super().__init__(name="simulate-feeder", daemon=True)
        self.plan, self.target, self.key, self.inboxes = plan, target, key, inboxes
        self.stop = threading.Event()  # make no more deliveries (the duration ended)
        self.abandon = threading.Event()  # the senders are being stopped: a broken pipe is no error
        self.primed = threading.Event()  # every sender has work, or there is no more
        self.error: BaseException | None = None
        self._fed = [0] * len(inboxes)

    def run(self) -> None:
        try:
            self._feed()
            for i in range(len(self.inboxes)):
                self._put(i, None)
        except BaseException as exc:  # handed to the parent, which raises it (unless it gave up already)
            if not self.abandon.is_set():
                self.error = exc
        finally:
            self.primed.set()

    def _feed(self) -> None:
        n = len(self.inboxes)
        batches: list[list[Delivery]] = [[] for _ in range(n)]
        for d in deliveries(self.plan, self.target, self.key):
            i = zlib.crc32(d.key.encode()) % n
            batches[i].append(d)
            if len(batches[i]) >= BATCH:
                self._put(i, batches[i])
                batches[i] = []
            if self.stop.is_set() or self.abandon.is_set():
                return
        for i, batch in enumerate(batches):
            if batch:
                self._put(i, batch)

    def _put(self, i: int, batch: Batch) -> None:
        self.inboxes[i].send(batch)
        self._fed[i] += 1
        if all(self._fed):
            self.primed.set()
