"""`make bench-streams`: events/s through the Faust worker, beside a plain confluent-kafka consume loop
over the same pre-filled topics (the ceiling), and the time from a 204 at the gateway to the change on
the worker's JSON API at 500 events/s.

Uses CALLSTREAM_KAFKA_BOOTSTRAP when set, else starts a throwaway local broker. Prints a markdown
table and replaces the streams section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from confluent_kafka import Consumer, Producer, TopicPartition

from bench.report import machine, write_section
from callstream.fakecalls import CallFactory, Fleet
from callstream.localkafka import KAFKA_VERSION, LocalKafka, free_port
from kernel.catalogue import EVENT_NAMES, Header, topic
from kernel.signature import sign
from kernel.topics import ensure_topics
from streams.alertrules import load_config
from streams.metrics import ALL
from streams.processor import DictStore, EventMessage, Processor

REPO = Path(__file__).resolve().parents[1]


def prefill(bootstrap: str, prefix: str, events: int) -> tuple[int, int]:
    """Realistic call/chat events, keyed by call id, with the gateway's headers.

    Returns (messages written, distinct events the worker must count): the two differ when the
    generator repeats a call id, whose second "call" is then deduplicated like a redelivery.
    """
    offline = Processor(DictStore(), load_config())
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    f = CallFactory(Fleet(seed=2, agents=5), seed=2, turns=(4, 8))
    n = 0
    now = int(time.time() * 1000)
    while n < events:
        for ev in f.events():
            body = ev.body()
            while True:
                try:
                    p.produce(
                        topic(prefix, ev.event),
                        key=ev.key,
                        value=body,
                        headers=[(Header.EVENT, ev.event), (Header.RECEIVED_AT, str(now + n // 100))],
                    )
                    offline.process([EventMessage(0, ev.event, ev.key.encode(), body, now + n // 100)])
                    break
                except BufferError:
                    p.poll(0.1)
            n += 1
        p.poll(0)
    p.flush()
    counted = sum(v for k, v in offline.book(0).totals[ALL].counts.items() if k.startswith("event:"))
    return n, counted


def ceiling(bootstrap: str, prefix: str, expect: int) -> float:
    """A plain confluent-kafka consume loop over the same topics: the events/s one process can read."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    tps = [TopicPartition(topic(prefix, e), p, 0) for e in EVENT_NAMES for p in range(3)]
    c.assign(tps)
    got, t0 = 0, time.perf_counter()
    while got < expect:
        for m in c.consume(num_messages=1000, timeout=1.0):
            if m.error() is None:
                _ = m.value()
                got += 1
    dt = time.perf_counter() - t0
    c.close()
    return got / dt


def _env(bootstrap: str, prefix: str, tmp: Path, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=bootstrap,
        CALLSTREAM_TOPIC_PREFIX=prefix,
        CALLSTREAM_API_KEYS=key,
        CALLSTREAM_DATA_DIR=str(tmp / f"faust-{prefix}"),
        CALLSTREAM_LOG_LEVEL="WARNING",
    )
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "callstream", *args],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def _events_counted(url: str) -> int:
    try:
        r = httpx.get(f"{url}/api/counts", timeout=5)
        return sum(r.json()["events"].values()) if r.status_code == 200 else -1
    except (httpx.HTTPError, ValueError, KeyError):
        return -1


def worker_throughput(bootstrap: str, prefix: str, expect: int, tmp: Path) -> tuple[float, float]:
    """(events/s while the worker drains the pre-filled topics, seconds from start to done)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(["worker", "--web-port", str(port)], _env(bootstrap, prefix, tmp, "k"), tmp / "worker-tp.log")
    t_start = time.perf_counter()
    try:
        first_t, first_n = None, 0
        last_n, last_change = -1, time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"worker exited; see {tmp / 'worker-tp.log'}")
            n = _events_counted(url)
            now = time.perf_counter()
            if n > 0 and first_t is None:
                first_t, first_n = now, n
            if n >= expect:
                assert first_t is not None
                rate = (n - first_n) / (now - first_t) if now > first_t else float("nan")
                return rate, now - t_start
            if n != last_n:
                last_n, last_change = n, now
            if now - last_change > 120:
                raise SystemExit(f"worker stuck at {n} of {expect} events for 2 min; see {tmp / 'worker-tp.log'}")
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(20)


def latency(bootstrap: str, prefix: str, tmp: Path, rate: float, seconds: float) -> tuple[list[float], float]:
    """Seconds from a probe's 204 at the gateway to the JSON API showing it, under `rate` events/s."""
    key = "bench-" + secrets.token_hex(8)
    env = _env(bootstrap, prefix, tmp, key)
    gport, wport = free_port(), free_port()
    gw = _start(["gateway", "--port", str(gport)], env, tmp / "gateway.log")
    wk = _start(["worker", "--web-port", str(wport)], env, tmp / "worker-lat.log")
    gurl, wurl = f"http://127.0.0.1:{gport}", f"http://127.0.0.1:{wport}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if (
                    httpx.get(f"{gurl}/healthz").status_code == 200
                    and httpx.get(f"{wurl}/api/counts").json()["complete"]
                ):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.3)
        # Background load straight into the topics at an exact rate: a Python HTTP sender cannot hold
        # 500/s on a shared 2-core box next to the gateway and the worker, and the worker's latency
        # is what is measured. The probes go through the gateway.
        f_load = CallFactory(Fleet(seed=3, agents=5), seed=3, turns=(4, 8))
        backlog: list = []
        while len(backlog) < int(rate * seconds):
            backlog.extend(f_load.events())
        sent = [0, 0.0]
        stop = threading.Event()

        def load() -> None:
            p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
            t0 = time.monotonic()
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
                sent[0] = i + 1
            p.flush()
            sent[1] = time.monotonic() - t0

        bg = threading.Thread(target=load)
        bg.start()
        probe_agent = "agent_latency_probe"
        f = CallFactory(Fleet(agent_ids=[probe_agent]), seed=9, turns=(2, 2))
        samples: list[float] = []
        client = httpx.Client(timeout=10)
        k = 0
        t_end = time.monotonic() + seconds - 2
        while time.monotonic() < t_end:
            ev = f.events("completed")[0]  # a call_started of a new call
            body = ev.body()
            r = client.post(f"{gurl}/webhook", content=body, headers={"x-retell-signature": sign(body, key)})
            t0 = time.perf_counter()
            if r.status_code != 204:
                continue
            k += 1
            while True:
                a = client.get(f"{wurl}/api/counts").json()["agents"].get(probe_agent, {})
                if a.get("call_started", 0) >= k:
                    samples.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() - t0 > 30:
                    raise SystemExit("a probe did not show on the API within 30 s")
                time.sleep(0.01)
            time.sleep(0.1)
        stop.set()
        bg.join()
        return samples, sent[0] / sent[1] if sent[1] else 0.0
    finally:
        for p in (gw, wk):
            p.terminate()
            p.wait(20)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="events pre-filled for the throughput run")
    ap.add_argument("--rate", type=float, default=500.0, help="events/s of background load in the latency run")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the latency run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as d:
        tmp = Path(d)
        broker = None
        bootstrap = os.environ.get("CALLSTREAM_KAFKA_BOOTSTRAP")
        if not bootstrap:
            broker = LocalKafka(
                home=tmp / "kafka",
                port=free_port(),
                controller_port=free_port(),
                heap="1g",
                jars=REPO / ".kafka" / "jars" / KAFKA_VERSION,
            )
            broker.start(wait=120, say=lambda s: print(s, file=sys.stderr))
            bootstrap = broker.bootstrap
        try:
            prefix = f"bench{uuid.uuid4().hex[:8]}"
            ensure_topics(bootstrap, prefix, partitions=3)
            print(f"pre-filling {args.events} events ...", file=sys.stderr)
            n, distinct = prefill(bootstrap, prefix, args.events)
            print("plain consume loop ...", file=sys.stderr)
            ceil = ceiling(bootstrap, prefix, n)
            print("worker ...", file=sys.stderr)
            wrate, wall = worker_throughput(bootstrap, prefix, distinct, tmp)
            print(f"latency at {args.rate:.0f} events/s for {args.seconds:.0f}s ...", file=sys.stderr)
            lprefix = f"benchlat{uuid.uuid4().hex[:8]}"
            ensure_topics(bootstrap, lprefix, partitions=3)
            samples, achieved = latency(bootstrap, lprefix, tmp, args.rate, args.seconds)
        finally:
            if broker is not None:
                broker.stop()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = (
        f"Machine: {machine()}. Run {when}; other work shared the cores, so treat the numbers as a floor.\n\n"
        "| measure | value |\n| --- | --- |\n"
        f"| events pre-filled (3 partitions, realistic bodies) | {n} |\n"
        f"| plain confluent-kafka consume loop (ceiling) | {ceil:,.0f} events/s |\n"
        f"| Faust worker (metrics, dedupe state, alerts; 1 worker) | {wrate:,.0f} events/s |\n"
        f"| worker / ceiling | {wrate / ceil:.2f} |\n"
        f"| worker wall time incl. start-up and rebalance | {wall:.1f} s |\n"
        f"| background load produced to Kafka during the latency run | {achieved:,.0f} events/s |\n"
        f"| 204 at gateway -> JSON API shows it, p50 | {1000 * pct(samples, 0.5):.0f} ms ({len(samples)} probes) |\n"
        f"| 204 at gateway -> JSON API shows it, p95 | {1000 * pct(samples, 0.95):.0f} ms |\n"
    )
    print(table)
    write_section("streams", f"## Streams\n\n{table}")


if __name__ == "__main__":
    main()
