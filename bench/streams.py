"""`make bench-streams`: the stream worker beside its peers, on two event mixes, and its freshness.

For each mix (the simulator's realistic one, and lifecycle events only) the topics are pre-filled
once, then read from the start, one after the other on the same broker, each with a fresh group:

1. a plain confluent-kafka consume loop: what one process can read (the ceiling for reading);
2. the same loop decoding every body with the worker's decoder: the ceiling of any Python processor;
3. a quixstreams application computing the same per-agent totals with per-call dedupe
   (bench/quix_app.py, in a venv of its own that the first run installs), once per consumer poll
   timeout; the fastest is its row, and it runs once more with quixstreams' JSON deserializer;
4. the real `callstream worker` process, its totals read from `/api/metrics`.

Every row checks what it counted against the expected totals (bench/streams_mix.py). Then the
freshness run: p50/p95 from a 204 at the gateway to the JSON API showing it, at 500 events/s.

Uses CALLSTREAM_KAFKA_BOOTSTRAP when set, else starts a throwaway local broker. Prints markdown
tables and replaces the streams section of bench/RESULTS.md (bench/profile_worker.py writes the
profile beside it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.report import bench_kafka, machine, write_section
from bench.streams_mix import MIXES, Expected, Mix, prefill
from bench.streams_peers import PARTITIONS, QUIX_POLL_TIMEOUTS, Row, consume_loop, quix, quix_python
from bench.streams_worker import latency, worker_row
from callstream.localkafka import KAFKA_VERSION
from kernel.catalogue import all_topics
from kernel.topics import ensure_topics, wait_for_topics

REPO = Path(__file__).resolve().parents[1]
# The goals for the worker, on both mixes.
GOAL_VS_QUIX = 3.0
GOAL_VS_DECODE = 0.40
GOAL_P95_S = 1.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


@contextlib.contextmanager
def broker(tmp: Path) -> Iterator[str]:
    """CALLSTREAM_KAFKA_BOOTSTRAP, or a throwaway local broker stopped when the block ends (a SIGTERM
    included: the broker, workers and apps started here are stopped on the way out)."""
    signal.signal(signal.SIGTERM, _stop)
    with bench_kafka(os.environ.get("CALLSTREAM_KAFKA_BOOTSTRAP"), tmp / "kafka", say) as bootstrap:
        yield bootstrap


def fresh_topics(bootstrap: str, name: str) -> str:
    prefix = f"bench{name}{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, prefix, partitions=PARTITIONS)
    wait_for_topics(bootstrap, all_topics(prefix))
    return prefix


@dataclass
class MixRun:
    exp: Expected
    rows: list[Row]

    def row(self, prefix: str) -> Row:
        return next(r for r in self.rows if r.processor.startswith(prefix))


def run_mix(bootstrap: str, mix: Mix, events: int, tmp: Path, timeouts: tuple[float, ...], qpy: Path) -> MixRun:
    prefix = fresh_topics(bootstrap, mix.name)
    say(f"[{mix.name}] pre-filling {events:,} messages ...")
    exp = prefill(bootstrap, prefix, mix, events)
    say(f"[{mix.name}] {exp.describe()}")
    rows = []
    steps: tuple[tuple[str, Callable[[], Row]], ...] = (
        ("plain consume loop", lambda: consume_loop(bootstrap, prefix, exp, decode=False)),
        ("consume + decode loop", lambda: consume_loop(bootstrap, prefix, exp, decode=True)),
        (f"quixstreams app, poll timeouts {timeouts}", lambda: quix(qpy, bootstrap, prefix, exp, tmp, timeouts)),
        ("callstream worker", lambda: worker_row(bootstrap, prefix, exp, tmp)),
    )
    for what, run in steps:
        say(f"[{mix.name}] {what} ...")
        row = run()
        say(f"[{mix.name}]   {row.rate:,.0f} messages/s, {row.cpu_us:.0f} µs CPU/message, {row.check}")
        rows.append(row)
    return MixRun(exp, rows)


def mix_table(run: MixRun) -> str:
    decode = run.row("consume loop + ").rate
    lines = [
        f"**{run.exp.mix.name}** ({run.exp.mix.description}): {run.exp.describe()}.\n",
        "| processor | events/s | CPU µs/event | of decode ceiling | totals | note |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    lines += [
        f"| {r.processor} | {r.rate:,.0f} | {r.cpu_us:.0f} | {r.rate / decode:.0%} | {r.check} | {r.note} |"
        for r in run.rows
    ]
    return "\n".join(lines) + "\n"


def goals(runs: list[MixRun], p95: float) -> str:
    out = []
    for run in runs:
        worker, q, decode = run.row("`callstream"), run.row("quixstreams"), run.row("consume loop + ")
        vs_q, vs_d = worker.rate / q.rate, worker.rate / decode.rate
        out.append(
            f"{run.exp.mix.name}: worker {vs_q:.1f}x the tuned quixstreams app (goal {GOAL_VS_QUIX:g}x: "
            f"{'met' if vs_q >= GOAL_VS_QUIX else 'not met'}), {vs_d:.0%} of the decode ceiling "
            f"(goal {GOAL_VS_DECODE:.0%}: {'met' if vs_d >= GOAL_VS_DECODE else 'not met'})"
        )
    out.append(
        f"freshness p95 {1000 * p95:.0f} ms (goal < {GOAL_P95_S:g} s: {'met' if p95 < GOAL_P95_S else 'not met'})"
    )
    return "Goals: " + "; ".join(out) + "."


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="messages pre-filled per mix")
    ap.add_argument("--mixes", default="realistic,lifecycle", help=f"comma-separated, of {', '.join(MIXES)}")
    ap.add_argument(
        "--quix-timeouts",
        default=",".join(f"{t:g}" for t in QUIX_POLL_TIMEOUTS),
        help="quixstreams consumer_poll_timeout values to try, seconds",
    )
    ap.add_argument("--rate", type=float, default=500.0, help="events/s of background load in the freshness run")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the freshness run (0: skip it)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    mixes = [MIXES[m] for m in args.mixes.split(",")]
    timeouts = tuple(float(t) for t in args.quix_timeouts.split(","))
    qpy = quix_python(say)
    load_before = os.getloadavg()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    samples: list[float] = []
    achieved = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as d, broker(Path(d)) as bootstrap:
        tmp = Path(d)
        runs = [run_mix(bootstrap, mix, args.events, tmp, timeouts, qpy) for mix in mixes]
        if args.seconds > 0:
            say(f"freshness at {args.rate:.0f} events/s for {args.seconds:.0f} s ...")
            samples, achieved = latency(bootstrap, fresh_topics(bootstrap, "lat"), tmp, args.rate, args.seconds)
    load_after = os.getloadavg()
    text = "\n".join(
        [
            f"`make bench-streams` on {started}; {machine()}. One Kafka {KAFKA_VERSION} broker on the same "
            f"machine, {PARTITIONS} partitions per topic, lz4. Load average {load_before[0]:.1f} at the start, "
            f"{load_after[0]:.1f} at the end: other work shared the 2 cores, so treat rates as a floor "
            "(CPU µs per event depends less on the neighbours).\n",
            "Each processor reads the same pre-filled topics from the start with a fresh consumer group. "
            "events/s are messages (redeliveries included) per second from the first message processed to the "
            "last; CPU µs/event is the process's user+system CPU, all threads, over the same span. The worker's "
            "rate is read from its `/api/counts` every 0.1 s.\n",
            *(mix_table(run) for run in runs),
            freshness(samples, achieved, args.rate) if samples else "",
            goals(runs, pct(samples, 0.95)) if samples else "",
        ]
    )
    print(text)
    if not args.no_write:
        write_section("streams", f"## Streams\n\n{text}")


def freshness(samples: list[float], achieved: float, rate: float) -> str:
    return (
        f"Freshness: background load of the realistic mix produced straight into the topics at {achieved:,.0f} "
        f"events/s (asked {rate:,.0f}); probes through the gateway, from the 204 until `/api/counts` shows them: "
        f"p50 {1000 * pct(samples, 0.5):.0f} ms, p95 {1000 * pct(samples, 0.95):.0f} ms ({len(samples)} probes).\n"
    )


if __name__ == "__main__":
    main()
