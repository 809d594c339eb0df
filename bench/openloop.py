"""An open-loop load generator: requests start on a fixed schedule, whatever the server does.

wrk measures the most a server can do; "p99 at 1,000 requests/s offered" needs a fixed rate, and
a latency measured from when each request was *due*, so a stall is not hidden by the generator
waiting on it (coordinated omission). Requests are pre-built bytes over keep-alive connections.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class OpenLoopResult:
    rate: float
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    late_starts: int = 0  # requests that found no free connection at their due time

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    @property
    def achieved(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)
    return status


async def run(
    host: str, port: int, requests: list[bytes], rate: float, seconds: float, connections: int = 64
) -> OpenLoopResult:
    """Send `requests` (complete HTTP/1.1 request bytes, cycled) at `rate`/s for `seconds`."""
    res = OpenLoopResult(rate=rate, seconds=seconds)
    free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        free.put_nowait(await asyncio.open_connection(host, port))
    tasks: set[asyncio.Task[None]] = set()

    async def one(req: bytes, due: float) -> None:
        if free.empty():
            res.late_starts += 1
        conn = await free.get()
        reader, writer = conn
        try:
            writer.write(req)
            status = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError):
            status = 0
            writer.close()
            conn = await asyncio.open_connection(host, port)
        res.latencies_ms.append((time.perf_counter() - due) * 1000)
        res.statuses[status] += 1
        free.put_nowait(conn)

    start = time.perf_counter()
    n = 0
    total = int(rate * seconds)
    while n < total:
        due = start + n / rate
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        t = asyncio.create_task(one(requests[n % len(requests)], due))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.gather(*tasks)
    res.seconds = time.perf_counter() - start
    while not free.empty():
        _, w = free.get_nowait()
        w.close()
    return res
