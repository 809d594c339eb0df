"""The real `callstream worker` (and gateway) as processes, for the streams benchmarks: start, watch
through the JSON API, stop; its throughput row, and the freshness run (204 at the gateway -> JSON API).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import httpx
from confluent_kafka import Producer

from bench.streams_mix import TOTALS, Expected, Totals, compare
from bench.streams_peers import Row
from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import free_port
from kernel.catalogue import Header, topic
from kernel.signature import sign

_TICK = os.sysconf("SC_CLK_TCK")


class _Event(Protocol):
    """What the benchmark uses of the simulator's events."""

    @property
    def event(self) -> str: ...

    @property
    def key(self) -> str: ...

    def body(self) -> bytes: ...


def worker_env(bootstrap: str, prefix: str, tmp: Path, key: str = "k") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=bootstrap,
        CALLSTREAM_TOPIC_PREFIX=prefix,
        CALLSTREAM_API_KEYS=key,
        CALLSTREAM_DATA_DIR=str(tmp / f"faust-{prefix}"),
        CALLSTREAM_LOG_LEVEL="WARNING",
    )
    return env


@contextlib.contextmanager
def running(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m callstream <args>`, stopped (SIGTERM, then SIGKILL) when the block ends."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "callstream", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (librdkafka's and Faust's consumer thread too)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def counted(url: str) -> int:
    """Distinct events the worker counted so far; -1 while it does not answer."""
    try:
        r = httpx.get(f"{url}/api/counts", timeout=5)
        return sum(r.json()["events"].values()) if r.status_code == 200 else -1
    except (httpx.HTTPError, ValueError, KeyError):
        return -1


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the worker exited; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"the worker was not ready within {timeout:.0f} s; see {log}")


class Drain:
    """Watches a worker drain pre-filled topics: rate and CPU from its first counted event to the last."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path, expect: int) -> None:
        self.url, self.proc, self.log, self.expect = url, proc, log, expect
        self.first_n = 0
        self.t0 = self.t1 = self.cpu0 = self.cpu1 = 0.0

    def wait(self, every: float = 0.1) -> None:
        last_n, last_change = -1, time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the worker exited; see {self.log}")
            n = counted(self.url)
            now, cpu = time.perf_counter(), cpu_seconds(self.proc.pid)
            if n > 0 and not self.first_n:
                self.first_n, self.t0, self.cpu0 = n, now, cpu
            if n >= self.expect:
                self.t1, self.cpu1 = now, cpu
                return
            if n != last_n:
                last_n, last_change = n, time.monotonic()
            if time.monotonic() - last_change > 120:
                raise SystemExit(f"the worker is stuck at {n} of {self.expect} events for 2 min; see {self.log}")
            time.sleep(every)

    @property
    def events(self) -> int:
        """Distinct events counted between the two readings."""
        return self.expect - self.first_n

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    @property
    def cpu(self) -> float:
        return self.cpu1 - self.cpu0


def agent_totals(url: str) -> Totals:
    agents = httpx.get(f"{url}/api/metrics", params={"minutes": 1}, timeout=10).json()["agents"]
    return {a: {name: int(s.get(name, 0)) for name in TOTALS} for a, s in agents.items()}


def worker_row(bootstrap: str, prefix: str, exp: Expected, tmp: Path) -> Row:
    """`callstream worker` drains the topics; its rate in messages/s like the other rows.

    The worker shows distinct events (redeliveries are not counted), so the messages behind them are
    the distinct events times messages/distinct, which is even over the mix.
    """
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp / f"worker-{prefix}.log"
    with running(["worker", "--web-port", str(port)], worker_env(bootstrap, prefix, tmp), log) as proc:
        drain = Drain(url, proc, log, exp.distinct)
        drain.wait()
        totals = agent_totals(url)
    messages = drain.events * exp.messages / exp.distinct
    return Row(
        "`callstream worker` (Faust: all metrics, windows, alerts, changelog)",
        messages / drain.seconds,
        1e6 * drain.cpu / messages,
        compare(exp.totals, totals),
    )


# -- freshness: a probe's 204 at the gateway until the JSON API shows it, under background load -------


def _load(bootstrap: str, prefix: str, backlog: list[_Event], rate: float, stop: threading.Event) -> float:
    """Produce `backlog` straight into the topics at `rate` events/s; the rate achieved."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    t0, sent = time.monotonic(), 0
    for i, ev in enumerate(backlog):
        if stop.is_set():
            break
        wait = t0 + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        p.produce(
            topic(prefix, ev.event),
            key=ev.key,
            value=ev.body(),
            headers=[(Header.EVENT, ev.event), (Header.RECEIVED_AT, str(int(time.time() * 1000)))],
        )
        p.poll(0)
        sent = i + 1
    p.flush()
    return sent / (time.monotonic() - t0)


def _probe(client: httpx.Client, gurl: str, wurl: str, body: bytes, key: str, k: int) -> float | None:
    """Seconds from the 204 of the k-th probe to the API counting k call_started of the probe agent."""
    r = client.post(f"{gurl}/webhook", content=body, headers={"x-retell-signature": sign(body, key)})
    t0 = time.perf_counter()
    if r.status_code != 204:
        return None
    while True:
        a = client.get(f"{wurl}/api/counts").json()["agents"].get("agent_latency_probe", {})
        if a.get("call_started", 0) >= k:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > 30:
            raise SystemExit("a probe did not show on the API within 30 s")
        time.sleep(0.01)


def latency(bootstrap: str, prefix: str, tmp: Path, rate: float, seconds: float) -> tuple[list[float], float]:
    """Seconds from a probe's 204 at the gateway to the JSON API showing it, under `rate` events/s."""
    key = "bench-" + secrets.token_hex(8)
    env = worker_env(bootstrap, prefix, tmp, key)
    gport, wport = free_port(), free_port()
    gurl, wurl = f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{wport}"
    with (
        running(["gateway", "--port", str(gport)], env, tmp / "gateway.log"),
        running(["worker", "--web-port", str(wport)], env, tmp / "worker-lat.log") as wk,
    ):
        wait_ready(wurl, wk, tmp / "worker-lat.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{gurl}/healthz").status_code == 200:
                    break
            time.sleep(0.3)
        # Background load straight into the topics at an exact rate: a Python HTTP sender cannot hold
        # 500/s on a shared 2-core box next to the gateway and the worker, and the worker's latency
        # is what is measured. The probes go through the gateway.
        f_load = CallFactory(Fleet(seed=3, agents=5), seed=3)  # the realistic mix, default transcripts
        backlog: list[_Event] = []
        while len(backlog) < int(rate * seconds):
            backlog.extend(f_load.events())
        stop, achieved = threading.Event(), [0.0]
        bg = threading.Thread(target=lambda: achieved.__setitem__(0, _load(bootstrap, prefix, backlog, rate, stop)))
        bg.start()
        probes = CallFactory(Fleet(agent_ids=["agent_latency_probe"]), seed=9, turns=(2, 2))
        samples: list[float] = []
        with httpx.Client(timeout=10) as client:
            t_end = time.monotonic() + seconds - 2
            while time.monotonic() < t_end:
                got = _probe(client, gurl, wurl, probes.events("completed")[0].body(), key, len(samples) + 1)
                if got is not None:
                    samples.append(got)
                time.sleep(0.1)
        stop.set()
        bg.join()
    return samples, achieved[0]
