"""`python -m bench.simulate`: can `callstream simulate` keep its rate, and does it tell the truth?

Starts a local Kafka broker (`callstream.localkafka.LocalKafka`) and `callstream gateway --workers N`,
then sends the simulator's realistic mix at a fixed rate for a while and reports the asked and the
achieved rate, the server latency the simulator measured (request written to response read), its
scheduling lag, the mix it sent, and the CPU it and the gateway spent. An independent probe process
(a few pre-signed requests per second on its own connections, `bench/openloop.py`) measures the
gateway's latency at the same time, to check the simulator's figure against a client that is not
busy. Every 204 is checked against the topics afterwards. Results: on stdout and in the
"Simulator" section of bench/RESULTS.md.

    python -m bench.simulate                      # 1,000 deliveries/s for 20 s, 1 sender process
    python -m bench.simulate --rate 1500 --processes 2 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import multiprocessing.queues
import os
import resource
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.gateway import http_requests, topic_total
from bench.openloop import run as open_loop
from bench.report import bench_broker, machine, write_section
from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import KAFKA_VERSION, LocalKafka, free_port
from callstream.procs import Process, ProcessFailed
from callstream.procs import callstream as start_callstream
from callstream.simulate import SimulationPlan, SimulationResult, run
from kernel.topics import ensure_topics

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "simulate"
PROBE_RATE = 20.0


def say(msg: str) -> None:
    print(f"[bench-simulate] {msg}", file=sys.stderr, flush=True)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for (the senders)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# -- the probe: an idle client on its own connections -----------------------------------------------


@dataclass(frozen=True)
class Probe:
    p50_ms: float
    p95_ms: float
    answered: int


def _probe(port: int, key: str, seconds: float, out: multiprocessing.queues.Queue[Probe]) -> None:
    f = CallFactory(Fleet(seed=3), seed=3)
    bodies = [f.events("completed")[0].body() for _ in range(32)]
    res = asyncio.run(
        open_loop("127.0.0.1", port, http_requests("127.0.0.1", port, bodies, key), PROBE_RATE, seconds, 4)
    )
    out.put(Probe(res.percentile(0.5), res.percentile(0.95), res.statuses.get(204, 0)))


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Stack:
    """The broker, topics and gateway the simulator sends to."""

    broker: LocalKafka | None
    bootstrap: str
    prefix: str
    key: str
    gateway: Process
    port: int

    @classmethod
    def start(cls, workers: int) -> Stack:
        broker = None
        bootstrap = os.environ.get("CALLSTREAM_KAFKA_BOOTSTRAP", "")
        if not bootstrap:
            broker = bench_broker(OUT / "kafka")
            broker.start(wait=120, say=say)
            bootstrap = broker.bootstrap
        prefix, key, port = f"bench{uuid.uuid4().hex[:8]}", f"bench_{uuid.uuid4().hex}", free_port()
        ensure_topics(bootstrap, prefix, partitions=3)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
        env.update(CALLSTREAM_KAFKA_BOOTSTRAP=bootstrap, CALLSTREAM_TOPIC_PREFIX=prefix, CALLSTREAM_API_KEYS=key)
        args = ["--log-level", "WARNING", "gateway", "--port", str(port), "--workers", str(workers)]
        gw = start_callstream("gateway", args, OUT / "gateway.log", env, cwd=OUT, url=f"http://127.0.0.1:{port}")
        stack = cls(broker, bootstrap, prefix, key, gw, port)
        try:
            gw.wait_http("/readyz", ok=lambda r: r.status_code == 200)
        except ProcessFailed:
            stack.stop()
            raise
        return stack

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhook"

    def stop(self) -> None:
        self.gateway.stop()
        if self.broker is not None:
            self.broker.stop(say=say)
            shutil.rmtree(self.broker.state, ignore_errors=True)  # benchmark messages only


@dataclass
class Measured:
    res: SimulationResult
    probe: Probe
    simulator_cpu_s: float
    gateway_cpu_s: float
    on_topics: int
    load_before: str
    load_after: str


def measure(stack: Stack, plan: SimulationPlan, warmup: float) -> Measured:
    if warmup > 0:
        say(f"warm-up: {warmup:.0f}s at {plan.rate:.0f}/s (not reported) ...")
        asyncio.run(run(stack.url, stack.key, dataclasses.replace(plan, duration=warmup)))
    time.sleep(1)
    before = topic_total(stack.bootstrap, stack.prefix)
    ctx = multiprocessing.get_context("spawn")
    probes: multiprocessing.queues.Queue[Probe] = ctx.Queue()
    assert plan.duration is not None
    prober = ctx.Process(target=_probe, args=(stack.port, stack.key, plan.duration, probes), daemon=True)
    load_before = load()
    say(f"run: {plan.rate:.0f}/s for {plan.duration:.0f}s, {plan.processes} sender process(es); load {load_before}")
    prober.start()
    cpu0, gw0 = cpu_s(), stack.gateway.cpu_s()
    res = asyncio.run(run(stack.url, stack.key, plan))
    cpu1, gw1 = cpu_s(), stack.gateway.cpu_s()
    probe = probes.get(timeout=60)
    prober.join(timeout=10)
    load_after = load()
    time.sleep(1)
    on_topics = topic_total(stack.bootstrap, stack.prefix) - before - probe.answered
    return Measured(res, probe, cpu1 - cpu0, gw1 - gw0, on_topics, load_before, load_after)


# -- the report -------------------------------------------------------------------------------------


def section(m: Measured, plan: SimulationPlan, workers: int) -> str:
    r = m.res
    lag = sorted(r.lags_ms)
    # Little's law: with at most `concurrency` in flight, the rate cannot pass concurrency / latency.
    mean = sum(r.latencies_ms) / max(1, len(r.latencies_ms))
    cap = plan.concurrency / (mean / 1000) if mean else float("inf")
    ok = r.statuses.get(204, 0)
    topics = "OK" if m.on_topics >= ok else "MISSING MESSAGES"
    verdict = "kept" if not r.fell_behind else "fell behind"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "## Simulator",
            "",
            f"`python -m bench.simulate` on {when}; {machine()}. Load average {m.load_before} at the start, "
            f"{m.load_after} at the end (the machine is shared: other work ran beside it). One local Kafka "
            f"{KAFKA_VERSION} broker, `callstream gateway --workers {workers}`, the simulator and the probe all "
            "on the same 2 cores.",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| asked / achieved rate | {plan.rate:,.0f} / {r.achieved_rate:,.0f} deliveries/s ({verdict}) |",
            f"| sender processes, deliveries in flight at most | {plan.processes}, {plan.concurrency} |",
            f"| what that cap allows at the mean server latency ({mean:.1f} ms) | {cap:,.0f} deliveries/s |",
            f"| deliveries (retries) in {r.seconds:.1f} s | {r.sent:,} ({r.retries}) |",
            f"| statuses | {dict(sorted(r.statuses.items()))} |",
            f"| server latency p50 / p95 / p99, as the simulator measured it | "
            f"{r.percentile(0.5):.1f} / {r.percentile(0.95):.1f} / {r.percentile(0.99):.1f} ms |",
            f"| same gateway, same moment, idle probe ({PROBE_RATE:.0f} req/s) p50 / p95 | "
            f"{m.probe.p50_ms:.1f} / {m.probe.p95_ms:.1f} ms |",
            f"| scheduling lag p50 / p95 / max | {_pct(lag, 0.5):.1f} / {_pct(lag, 0.95):.1f} / "
            f"{max(lag, default=0.0):.1f} ms |",
            f"| simulator CPU (feeder and senders) | {1e6 * m.simulator_cpu_s / max(1, r.sent):.0f} µs/delivery |",
            f"| gateway CPU | {1e6 * m.gateway_cpu_s / max(1, r.sent):.0f} µs/delivery |",
            f"| every 204 on a topic | {topics} ({ok:,} answered 204, {m.on_topics:,} new messages) |",
            "",
            f"Mix sent: {r.mix()}.",
            "",
            "Server latency is each request's, from written to its response read; the lag of the schedule "
            "(how late each delivery started against its planned time) is apart. The probe's figure is "
            "measured from each request's due time by a separate process that sends little.",
            "Re-run: `python -m bench.simulate` (`--rate`, `--seconds`, `--processes`, `--gateway-workers`).",
        ]
    )


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rate", type=float, default=1000, help="planned deliveries per second (default 1000)")
    ap.add_argument("--seconds", type=float, default=20, help="length of the measured run (default 20)")
    ap.add_argument("--warmup", type=float, default=5, help="seconds of unreported traffic first (default 5)")
    ap.add_argument("--processes", type=int, default=1, help="simulator sender processes (default 1)")
    ap.add_argument("--concurrency", type=int, default=64, help="deliveries in flight at most (default 64)")
    ap.add_argument("--gateway-workers", type=int, default=2, help="gateway processes (default 2)")
    ap.add_argument("--no-write", action="store_true", help="print the section only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    plan = SimulationPlan(duration=args.seconds, rate=args.rate, processes=args.processes, concurrency=args.concurrency)
    stack = Stack.start(args.gateway_workers)
    try:
        m = measure(stack, plan, args.warmup)
    finally:
        stack.stop()
    say(m.res.summary())
    text = section(m, plan, args.gateway_workers)
    print(text)
    if not args.no_write:
        write_section("simulate", text)
        say("wrote the Simulator section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
