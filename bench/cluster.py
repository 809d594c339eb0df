"""`make bench-cluster`: the gateway and the stream worker on a three-node Kafka cluster against one
broker, in one run.

Both Kafkas run on this machine's loopback for the whole run: one broker (replication factor 1), and
the three KRaft nodes of `callstream kafka start --brokers 3` (replication factor 3,
min.insync.replicas 2, so every acknowledged write is on two brokers at least). For each:
  - the gateway's req/s, p50 and p99 under wrk (closed loop, 64 connections, 1 process), sending the
    simulator's realistic mix of pre-signed bodies, and the gateway's CPU µs per request; the two
    Kafkas take turns, `--repeat` rounds, the best round of each reported (the least disturbed on a
    shared machine);
  - freshness: 500 events/s of the realistic mix produced straight into the topics while probes go
    through the gateway, from each probe's 204 until the worker's `/api/counts` shows it (p50, p95);
  - every 204 counted against the topics' offsets.
Results: a table on stdout and the "Cluster" section of bench/RESULTS.md.

    python -m bench.cluster                    # the full run
    python -m bench.cluster --seconds 5 --repeat 1 --fresh-seconds 10 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.gateway import OUT, WrkResult, ensure_wrk, gateway, measured_wrk, mixed_events, topic_total, write_requests
from bench.report import machine, write_section
from bench.streams import pct
from bench.streams_worker import latency
from callstream.localcluster import LocalCluster
from callstream.localkafka import KAFKA_VERSION, LocalKafka, free_port
from kernel.topics import ensure_topics, resolve_replication

REPO = Path(__file__).resolve().parents[1]
JARS = REPO / ".kafka" / "jars" / KAFKA_VERSION


def say(msg: str) -> None:
    print(f"[bench-cluster] {msg}", file=sys.stderr, flush=True)


@dataclass
class Setup:
    """One Kafka under test and what was measured on it."""

    name: str
    bootstrap: str
    runs: list[tuple[WrkResult, float]] = field(default_factory=list)
    acked: int = 0  # requests wrk saw answered 2xx, the warm-up's too
    stored: int = 0  # messages on the topics afterwards
    prefix: str = ""
    fresh: list[float] = field(default_factory=list)
    fresh_rate: float = 0.0

    def best(self) -> tuple[WrkResult, float]:
        return max(self.runs, key=lambda x: x[0].rps)


@contextlib.contextmanager
def kafkas(tmp: Path) -> Iterator[list[Setup]]:
    """One broker and a three-node cluster, both on loopback, stopped and deleted afterwards."""
    single = LocalKafka(home=tmp / "single", port=free_port(), controller_port=free_port(), heap="1g", jars=JARS)
    ports, controllers = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    cluster = LocalCluster.on_ports(
        tmp / "cluster", 3, ports=ports, controller_ports=controllers, heap="768m", jars=JARS
    )
    single.start(wait=120, say=say)
    try:
        cluster.start(wait=240, say=say)
        try:
            yield [
                Setup("1 broker, replication 1", single.bootstrap),
                Setup("3 brokers, replication 3", cluster.bootstrap),
            ]
        finally:
            cluster.stop(say=say)
    finally:
        single.stop(say=say)


def env_for(setup: Setup, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=setup.bootstrap,
        CALLSTREAM_TOPIC_PREFIX=setup.prefix,
        CALLSTREAM_API_KEYS=key,
        CALLSTREAM_LOG_LEVEL="WARNING",
    )
    return env


def wrk_round(setup: Setup, wrk: str, requests: Path, key: str, args: argparse.Namespace, seconds: float) -> None:
    gw = gateway(1, env_for(setup, key))
    try:
        say(f"{setup.name}: wrk {seconds:.0f}s ...")
        runs = measured_wrk(1, gw, wrk, gw.url + "/webhook", requests, seconds, 64, 1)
    finally:
        gw.stop()
    setup.runs += runs
    setup.acked += sum(r.requests - r.non_2xx for r, _ in runs)


def measure(setups: list[Setup], args: argparse.Namespace, tmp: Path) -> None:
    wrk = ensure_wrk()
    key = f"bench_{uuid.uuid4().hex}"
    bodies = [e.body() for e in mixed_events(2000)]
    OUT.mkdir(parents=True, exist_ok=True)
    requests = write_requests(OUT / "cluster-req.tsv", bodies, key)
    for s in setups:
        s.prefix = f"bc{uuid.uuid4().hex[:8]}"
        ensure_topics(s.bootstrap, s.prefix, 3)
        say(f"{s.name}: topics with replication {resolve_replication(s.bootstrap)}")
    for s in setups:  # unreported: the fresh JVMs compile and elect
        wrk_round(s, wrk, requests, key, args, args.warmup)
        s.runs = []
    for _ in range(args.repeat):
        for s in setups:
            wrk_round(s, wrk, requests, key, args, args.seconds)
    for s in setups:
        s.stored = topic_total(s.bootstrap, s.prefix)
        say(f"{s.name}: {s.stored:,} messages on the topics, {s.acked:,} requests answered 2xx")
    for s in setups:
        say(f"{s.name}: freshness at {args.rate:.0f} events/s for {args.fresh_seconds:.0f}s ...")
        prefix = f"bf{uuid.uuid4().hex[:8]}"
        ensure_topics(s.bootstrap, prefix, 3)
        s.fresh, s.fresh_rate = latency(s.bootstrap, prefix, tmp, args.rate, args.fresh_seconds)


def report(setups: list[Setup], args: argparse.Namespace, started: str, loads: tuple[str, str]) -> str:
    rows = [
        "| Kafka | gateway req/s | p50 ms | p99 ms | gateway CPU µs/req | non-2xx "
        "| freshness p50 | freshness p95 | probes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in setups:
        r, cpu = s.best()
        rows.append(
            f"| {s.name} | {r.rps:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {cpu:.0f} | {r.non_2xx} | "
            f"{1000 * pct(s.fresh, 0.5):.0f} ms | {1000 * pct(s.fresh, 0.95):.0f} ms | {len(s.fresh)} |"
        )
    one, three = (s.best()[0] for s in setups)
    return "\n".join(
        [
            f"`make bench-cluster` on {started}; {machine()}. Load average {loads[0]} at the start, {loads[1]} at "
            "the end: other work shared the cores, so read the wall-clock figures as a floor and compare the two "
            "rows with each other (they took turns, in the same run).\n",
            f"Both Kafkas ran on this machine's loopback throughout: one Kafka {KAFKA_VERSION} broker, and three "
            "KRaft nodes (`callstream kafka start --brokers 3`: every node broker and controller) whose topics have "
            "3 replicas and min.insync.replicas 2. The gateway (1 process, acks=all, idempotent producer) took wrk "
            f"load of the simulator's realistic mix, pre-signed (64 connections, {args.seconds:.0f} s, best of "
            f"{args.repeat} rounds taken in turns). Freshness: {args.rate:.0f} events/s of the realistic mix straight "
            "into the topics, probes through the gateway, from the 204 until the worker's `/api/counts` shows "
            "them.\n",
            *rows,
            "",
            f"Three brokers answer {three.rps / one.rps:.0%} of one broker's req/s, with p99 {three.p99_ms:.0f} ms "
            f"against {one.p99_ms:.0f} ms. With acks=all each write waits until every in-sync replica (all "
            "three, while all are healthy) has fetched it, and here the three JVMs share the same cores as the "
            "gateway, wrk and each other, so every hop of that wait queues for a CPU. The gateway is waiting, not "
            "working: its CPU is "
            f"{_cores(setups[1])} of a core on three brokers against {_cores(setups[0])} on one, and its CPU per "
            "request is higher on three (not profiled: the producer's work per request to a broker is shared by "
            "fewer messages, we think). The worker reads an event only once every in-sync "
            "replica has it, so the same wait is in its freshness.\n",
            "Every 204 on a topic: "
            + "; ".join(
                f"{s.name}: {s.acked:,} answered 2xx, {s.stored:,} messages "
                f"({'OK' if s.stored >= s.acked else 'MISSING'})"
                for s in setups
            )
            + " (more on the topics is possible: a request in flight when wrk stops is stored uncounted).\n",
            "Re-run: `make bench-cluster` (`BENCH_ARGS='--seconds 5 --repeat 1 --fresh-seconds 10'` for a quick one).",
        ]
    )


def _cores(setup: Setup) -> str:
    r, cpu_us = setup.best()
    return f"{r.rps * cpu_us / 1e6:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each wrk run")
    ap.add_argument("--repeat", type=int, default=2, help="wrk rounds per Kafka, taken in turns")
    ap.add_argument("--warmup", type=float, default=5.0, help="unreported wrk seconds per Kafka first")
    ap.add_argument("--rate", type=float, default=500.0, help="background events/s in the freshness run")
    ap.add_argument("--fresh-seconds", type=float, default=30.0, help="length of each freshness run")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    before = ", ".join(f"{x:.1f}" for x in os.getloadavg()[:2])
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        with kafkas(tmp) as setups:
            measure(setups, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gigabytes of benchmark messages
    after = ", ".join(f"{x:.1f}" for x in os.getloadavg()[:2])
    text = report(setups, args, started, (f"{before} (1, 5 min)", after))
    print(text)
    if not args.no_write:
        write_section("cluster", f"## Cluster\n\n{text}")


if __name__ == "__main__":
    main()
