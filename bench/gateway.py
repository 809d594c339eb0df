"""`make bench-gateway`: signed deliveries through the real gateway into a real broker (acks=all).

For each process count (1, and `--workers 2`), the same wrk load against
  - the ceiling: `bench/ceiling.py`, a bare ASGI app on the same uvicorn settings that only reads
    the body and answers 204, and
  - the gateway: `callstream gateway`, verifying each signature and waiting for Kafka's ack,
with a ~1 KB `call_started` body and a ~30 KB `call_analyzed` body; then p50/p99 at a fixed offered
rate (open loop, `bench/openloop.py`), and the gateway's RSS over a soak run of simulator traffic.
Every 204 is checked against the topics' offsets afterwards. Results: a markdown table on stdout and
the "Gateway" section of bench/RESULTS.md.

    python -m bench.gateway                 # the full run (5-minute soak)
    python -m bench.gateway --soak 30       # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.openloop import run as open_loop
from bench.report import RESULTS, bench_broker, machine, write_section
from callstream.fakecalls import CallFactory, Event, Fleet
from callstream.localkafka import KAFKA_VERSION, free_port
from callstream.procs import Process, ProcessFailed, spawn
from callstream.simulate import schedule
from gateway.routing import route
from kernel.catalogue import all_topics
from kernel.signature import sign, verify
from kernel.topics import ensure_topics

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "gateway"
WRK_LUA = """-- Cycles pre-signed requests: one line per request, "<x-retell-signature>\\t<body>".
local reqs = {}
for line in io.lines(os.getenv("BENCH_REQUESTS")) do
  local tab = line:find("\\t", 1, true)
  reqs[#reqs + 1] = wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["x-retell-signature"] = line:sub(1, tab - 1),
  }, line:sub(tab + 1))
end
local i = 0
request = function()
  i = i % #reqs + 1
  return reqs[i]
end
"""


def say(msg: str) -> None:
    print(f"[bench-gateway] {msg}", file=sys.stderr, flush=True)


# -- tools --------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk:
        say(f"load generator: {wrk}")
        return wrk
    if os.geteuid() == 0 and shutil.which("apt-get"):
        say("wrk is not installed; installing Debian's wrk with apt-get (once) ...")
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, stdout=subprocess.DEVNULL)
        wrk = shutil.which("wrk")
        if wrk:
            return wrk
    sys.exit("bench-gateway needs wrk: `sudo apt-get install wrk` (Debian/Ubuntu) or `brew install wrk`.")


# -- bodies -------------------------------------------------------------------------------------


def bodies(kind: str, n: int = 64) -> list[bytes]:
    """`n` distinct bodies: call_started of ~1 KB or call_analyzed of ~30 KB."""
    if kind == "call_started":
        f = CallFactory(Fleet(seed=5), seed=5)
        # Dynamic variables and metadata as production agents carry them bring the body to ~1 KB.
        extra: dict[str, Any] = {
            "retell_llm_dynamic_variables": {
                "customer_name": "Jordan Miller",
                "customer_email": "jordan.miller@example.com",
                "account_tier": "gold",
                "preferred_language": "en-US",
                "last_visit": "2026-10-14",
                "open_balance": "142.50",
                "clinic_address": "1200 Market Street, Suite 400, San Francisco, CA",
                "notes": "Prefers afternoon appointments; asked about whitening last time.",
            },
            "metadata": {"campaign": "reminders", "crm_contact_id": "0035e00001ABCDEFG", "batch": "2026-11-23-am"},
        }
        return [f.events("completed", **extra)[0].body() for _ in range(n)]
    f = CallFactory(Fleet(seed=5), seed=5, turns=(20, 24))
    return [f.events("completed")[-1].body() for _ in range(n)]


def mixed_events(n: int, seed: int = 9) -> list[Event]:
    """Simulator traffic: every event type in its realistic mix."""
    evs = schedule(CallFactory(Fleet(seed=seed), seed=seed), calls=10**9)
    return [next(evs) for _ in range(n)]


def write_requests(path: Path, payloads: list[bytes], key: str) -> Path:
    path.write_bytes(b"".join(sign(b, key).encode() + b"\t" + b + b"\n" for b in payloads))
    return path


def http_requests(host: str, port: int, payloads: list[bytes], key: str) -> list[bytes]:
    """Complete HTTP/1.1 requests, signed now (signatures are valid for 5 minutes)."""
    out = []
    for b in payloads:
        head = (
            f"POST /webhook HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"x-retell-signature: {sign(b, key)}\r\nContent-Length: {len(b)}\r\n\r\n"
        )
        out.append(head.encode() + b)
    return out


# -- servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server under load: its process and the port it listens on."""

    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self, path: str, want: int) -> None:
        try:
            self.process.wait_http(path, ok=lambda r: r.status_code == want)
        except ProcessFailed as exc:
            sys.exit(str(exc))

    def rss_mb(self) -> float:
        return self.process.rss_mb()

    def stop(self) -> None:
        self.process.stop()


def cpu_s(server: Server) -> float:
    return server.process.cpu_s()


def mandated_us(payloads: list[bytes], key: str, prefix: str, rounds: int = 20) -> tuple[float, float]:
    """CPU microseconds per request, in this process, of the two steps no gateway may skip:
    verifying the HMAC over the whole body, and routing (which rejects malformed JSON)."""
    keys = [key.encode()]
    signed = [(b, sign(b, key)) for b in payloads]
    t0 = time.process_time()
    for _ in range(rounds):
        for b, h in signed:
            verify(b, h, keys)
    t1 = time.process_time()
    for _ in range(rounds):
        for b, _h in signed:
            route(b, prefix)
    t2 = time.process_time()
    n = rounds * len(signed)
    return 1e6 * (t1 - t0) / n, 1e6 * (t2 - t1) / n


def start_server(name: str, cmd: list[str], env: dict[str, str], port: int) -> Server:
    return Server(spawn(name, cmd, OUT / f"{name}.log", env, cwd=OUT, url=f"http://127.0.0.1:{port}"), port)


def ceiling(workers: int, env: dict[str, str]) -> Server:
    port = free_port()
    s = start_server(
        f"ceiling-w{workers}",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.ceiling:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--no-access-log",
            "--no-proxy-headers",
            "--log-level",
            "warning",
        ],
        {**env, "PYTHONPATH": str(REPO)},
        port,
    )
    s.wait("/", 204)
    return s


def gateway(workers: int, env: dict[str, str], fast_path: bool = True) -> Server:
    port = free_port()
    s = start_server(
        f"gateway-w{workers}{'' if fast_path else '-fastapi'}",
        [
            sys.executable,
            "-m",
            "callstream",
            "--log-level",
            "WARNING",
            "gateway",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        {**env, "CALLSTREAM_WEBHOOK_FAST_PATH": str(fast_path).lower()},
        port,
    )
    s.wait("/readyz", 200)
    return s


# -- load ---------------------------------------------------------------------------------------


class WrkOutputError(ValueError):
    """wrk printed something this parser does not understand."""


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    errors: int


# wrk prints a duration in the largest unit that keeps it >= 1 (us, ms, s, m, h) and pads a one-letter
# unit with spaces so that it lines up with the two-letter ones: `1.40s ` has a trailing space.
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)(us|ms|s|m|h)\s*")
_PERCENTILE = re.compile(r"^[ \t]+(\d+)%[ \t]+(\S+)[ \t]*$", re.M)


def latency_ms(text: str) -> float:
    """A wrk duration (`148.00us`, `4.38ms`, `1.40s `, `1.02m `) in milliseconds."""
    m = _DURATION.fullmatch(text)
    if m is None:
        raise WrkOutputError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """The figures of one `wrk --latency` run, from what it printed."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    pct = dict(_PERCENTILE.findall(text))
    if rps is None or "50" not in pct or "99" not in pct:
        raise WrkOutputError("no Requests/sec or no latency distribution (was --latency given?)")
    done = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=latency_ms(pct["50"]),
        p99_ms=latency_ms(pct["99"]),
        requests=int(done.group(1)) if done else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        errors=sum(int(x) for x in errs.groups()) if errs else 0,
    )


def measured_wrk(repeat: int, server: Server, *args: Any) -> list[tuple[WrkResult, float]]:
    """`repeat` wrk runs, each with the server's CPU microseconds per request during it. On a shared
    machine the best run is the one least disturbed: callers report the one with the highest req/s."""
    runs = []
    for _ in range(max(1, repeat)):
        c0 = cpu_s(server)
        r = run_wrk(*args)
        runs.append((r, 1e6 * (cpu_s(server) - c0) / max(1, r.requests)))
    return runs


def _fastest(runs: list[tuple[WrkResult, float]]) -> tuple[WrkResult, float]:
    return max(runs, key=lambda x: x[0].rps)


def run_wrk(wrk: str, url: str, requests: Path, seconds: float, connections: int, threads: int) -> WrkResult:
    script = OUT / "signed.lua"
    script.write_text(WRK_LUA)
    proc = subprocess.run(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "-s", str(script), url],
        env={**os.environ, "BENCH_REQUESTS": str(requests)},
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    try:
        return parse_wrk(proc.stdout)
    except WrkOutputError as exc:
        sys.exit(f"cannot read wrk's output ({exc}):\n{proc.stdout}\n{proc.stderr}")


def topic_total(bootstrap: str, prefix: str) -> int:
    """Messages on every topic of `prefix` (high watermarks; the topics start empty)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}"})
    total = 0
    try:
        md = c.list_topics(timeout=10)
        for t in all_topics(prefix):
            for p in md.topics[t].partitions if t in md.topics else []:
                _, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                total += hi
    finally:
        c.close()
    return total


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What every part of a run shares: the options, the broker and key, the bodies, and the tallies."""

    args: argparse.Namespace
    wrk: str
    bootstrap: str
    prefix: str
    key: str
    env: dict[str, str]
    payloads: dict[str, list[bytes]]
    rows: list[str] = field(default_factory=list)  # the wrk table
    notes: list[str] = field(default_factory=list)  # the fixed-rate table
    cpu: dict[tuple[int, str], tuple[float, float]] = field(default_factory=dict)  # gateway, ceiling CPU us/req
    acked: int = 0  # deliveries answered 204, to compare with the topics' offsets

    def kb(self, kind: str) -> float:
        ps = self.payloads[kind]
        return sum(map(len, ps)) / len(ps) / 1024

    def one_run(self, server: Server, payloads: list[bytes], seconds: float) -> WrkResult:
        a = self.args
        req = write_requests(OUT / "req.tsv", payloads, self.key)
        return run_wrk(self.wrk, server.url + "/webhook", req, seconds, a.connections, a.threads)

    def measured(self, server: Server, payloads: list[bytes]) -> list[tuple[WrkResult, float]]:
        a = self.args
        req = write_requests(OUT / "req.tsv", payloads, self.key)
        return measured_wrk(
            a.repeat, server, self.wrk, server.url + "/webhook", req, a.seconds, a.connections, a.threads
        )


def table_row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.gateway", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = ap.add_argument
    add("--seconds", type=float, default=15, help="length of each wrk run (default 15)")
    add("--connections", type=int, default=64, help="wrk connections (default 64)")
    add("--threads", type=int, default=1, help="wrk threads (default 1: leaves a core to the server)")
    add("--warmup", type=float, default=10, help="seconds of unreported load first (default 10)")
    add(
        "--repeat",
        type=int,
        default=1,
        help="wrk runs per cell, the best one reported (default 1; 2-3 on a shared machine)",
    )
    add("--workers", default="1,2", help="gateway/ceiling process counts to compare (default 1,2)")
    add("--rate", type=float, default=1000, help="offered rate for the fixed-rate latency run (default 1000)")
    add("--rate-seconds", type=float, default=20, help="length of the fixed-rate run (default 20)")
    add("--soak", type=float, default=300, help="soak run in seconds for the RSS figures (default 300; 0 skips)")
    add("--soak-rate", type=float, default=500, help="offered rate of simulator traffic in the soak (default 500)")
    add(
        "--compare-fastapi",
        action="store_true",
        help="also run the gateway with POST /webhook served by the FastAPI route (1 process)",
    )
    add("--no-write", action="store_true", help="print the table only; leave bench/RESULTS.md alone")
    return ap.parse_args()


@contextlib.contextmanager
def kafka() -> Iterator[str]:
    """CALLSTREAM_KAFKA_BOOTSTRAP if set; else a broker of the run's own, stopped and deleted afterwards."""
    external = os.environ.get("CALLSTREAM_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    broker = bench_broker(OUT / "kafka")
    broker.start(wait=120, say=say)
    try:
        yield broker.bootstrap
    finally:
        broker.stop(say=say)
        # Gigabytes of benchmark messages; nothing in them is worth keeping.
        shutil.rmtree(broker.state, ignore_errors=True)


def prepare(args: argparse.Namespace, wrk: str, bootstrap: str) -> Bench:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, prefix, partitions=3)
    key = f"bench_{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    env.update(CALLSTREAM_KAFKA_BOOTSTRAP=bootstrap, CALLSTREAM_TOPIC_PREFIX=prefix, CALLSTREAM_API_KEYS=key)
    payloads = {"call_started": bodies("call_started"), "call_analyzed": bodies("call_analyzed")}
    b = Bench(args, wrk, bootstrap, prefix, key, env, payloads)
    say(
        f"bodies: call_started ~{b.kb('call_started'):.1f} KB, call_analyzed ~{b.kb('call_analyzed'):.1f} KB; "
        f"broker {bootstrap} (acks=all), prefix {prefix}"
    )
    return b


def warm_up(b: Bench) -> int:
    """Unreported load first; return the messages it left on the topics."""
    if b.args.warmup <= 0:
        return 0
    # A fresh broker's JVM is still compiling and electing: without this the first cells carry
    # hundreds of milliseconds of tail that has nothing to do with the gateway.
    say(f"warm-up: {b.args.warmup:.0f}s of load through a gateway into the broker (not reported) ...")
    gw = gateway(1, b.env)
    try:
        for ps in b.payloads.values():
            b.one_run(gw, ps, b.args.warmup / 2)
    finally:
        gw.stop()
    return topic_total(b.bootstrap, b.prefix)


def ceiling_cells(b: Bench, workers: int) -> dict[str, tuple[WrkResult, float]]:
    ceil: dict[str, tuple[WrkResult, float]] = {}
    srv = ceiling(workers, b.env)
    try:
        for kind, ps in b.payloads.items():
            say(f"ceiling, {workers} process(es), {kind}: wrk {b.args.seconds:.0f}s ...")
            ceil[kind] = _fastest(b.measured(srv, ps))
    finally:
        srv.stop()
    return ceil


def gateway_cells(b: Bench, workers: int, fast: bool, ceil: dict[str, tuple[WrkResult, float]]) -> None:
    """The gateway's row per body beside the ceiling's, then (fast path only) the fixed-rate run."""
    gw = gateway(workers, b.env, fast_path=fast)
    label = "gateway" if fast else "gateway (FastAPI route)"
    try:
        for kind, ps in b.payloads.items():
            say(f"{label}, {workers} process(es), {kind}: wrk {b.args.seconds:.0f}s ...")
            runs = b.measured(gw, ps)
            b.acked += sum(x.requests - x.non_2xx for x, _ in runs)
            r, r_us = _fastest(runs)
            c, c_us = ceil[kind]
            if fast:
                b.cpu[(workers, kind)] = (r_us, c_us)
            b.rows.append(
                table_row(
                    f"{kind} ~{b.kb(kind):.0f} KB",
                    workers,
                    label,
                    f"{r.rps:,.0f}",
                    f"{r.p50_ms:.1f}",
                    f"{r.p99_ms:.1f}",
                    f"{r_us:.0f}",
                    f"{c.rps:,.0f}",
                    f"{c.p50_ms:.1f}",
                    f"{c.p99_ms:.1f}",
                    f"{c_us:.0f}",
                    f"{100 * r.rps / c.rps:.0f}%",
                    r.non_2xx + r.errors,
                )
            )
        if fast:
            fixed_rate(b, gw, workers)
    finally:
        gw.stop()


def fixed_rate(b: Bench, gw: Server, workers: int) -> None:
    a = b.args
    say(
        f"gateway, {workers} process(es): {a.rate:.0f} req/s offered for {a.rate_seconds:.0f}s "
        "(open loop, call_analyzed) ..."
    )
    reqs = http_requests("127.0.0.1", gw.port, b.payloads["call_analyzed"], b.key)
    ol = asyncio.run(open_loop("127.0.0.1", gw.port, reqs, a.rate, a.rate_seconds))
    b.acked += ol.statuses.get(204, 0)
    b.notes.append(
        table_row(
            workers,
            f"{a.rate:,.0f}",
            f"{ol.achieved:,.0f}",
            f"{ol.percentile(0.5):.1f}",
            f"{ol.percentile(0.99):.1f}",
            f"{ol.percentile(0.999):.1f}",
            sum(n for s, n in ol.statuses.items() if s != 204),
        )
    )


def soak(b: Bench) -> str:
    """Simulator traffic for `--soak` seconds against one process; return the Memory line."""
    a = b.args
    if a.soak <= 0:
        return "skipped (--soak 0)"
    gw = gateway(1, b.env)
    try:
        evs = mixed_events(4000)
        time.sleep(1)
        series = [gw.rss_mb()]
        say(
            f"soak: simulator traffic at {a.soak_rate:.0f} req/s for {a.soak:.0f}s; RSS at start {series[0]:.0f} MB ..."
        )
        statuses: dict[int, int] = {}
        left = a.soak
        while left > 0:
            seg = min(60.0, left)
            # Re-signed per minute: a signature is only valid for five.
            reqs = http_requests("127.0.0.1", gw.port, [e.body() for e in evs], b.key)
            ol = asyncio.run(open_loop("127.0.0.1", gw.port, reqs, a.soak_rate, seg))
            for s, n in ol.statuses.items():
                statuses[s] = statuses.get(s, 0) + n
            left -= seg
            series.append(gw.rss_mb())
            say(f"soak: {a.soak - left:.0f}s, RSS {series[-1]:.0f} MB, p99 {ol.percentile(0.99):.1f} ms")
    finally:
        gw.stop()
    b.acked += statuses.get(204, 0)
    return (
        f"{a.soak:.0f} s of simulator traffic at {a.soak_rate:.0f} req/s, 1 process: RSS "
        f"{series[0]:.0f} MB at start, {series[-1]:.0f} MB at the end (per minute: "
        f"{', '.join(f'{x:.0f}' for x in series)} MB); statuses {dict(sorted(statuses.items()))}"
    )


# -- report -------------------------------------------------------------------------------------


def _cpu_paragraph(b: Bench, floor: dict[str, tuple[float, float]]) -> str:
    mandated = "; ".join(
        f"{kind}: HMAC-SHA256 verification {v:.0f} µs + routing decode (rejects malformed JSON) "
        f"{r:.0f} µs = {v + r:.0f} µs"
        for kind, (v, r) in floor.items()
    )
    allowance = "; ".join(
        f"{kind}, {w} process(es): {c_us / 0.6:.0f} µs of server CPU per request (the gateway spent {g_us:.0f})"
        for (w, kind), (g_us, c_us) in sorted(b.cpu.items())
    )
    return (
        "Server CPU µs/req: user + system CPU of the server's processes (librdkafka's threads included) "
        "per request answered during the run. What no gateway can skip, measured in-process on the "
        f"same bodies: {mandated}. Reaching 60% of the ceiling's req/s at the ceiling's CPU efficiency would "
        f"allow {allowance}. On 2 cores the broker and wrk share the same CPUs, so the server cannot buy "
        "time elsewhere."
    )


def section(b: Bench, floor: dict[str, tuple[float, float]], soak_line: str, on_topics: int) -> str:
    a = b.args
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "## Gateway",
            "",
            f"`make bench-gateway` on {when}; {machine()}. Load generator on the same machine (wrk, "
            f"{a.threads} thread, {a.connections} connections, {a.seconds:.0f} s per run, best of {a.repeat}); "
            f"one local Kafka {KAFKA_VERSION} broker, acks=all, idempotent producer, lz4. Ceiling: "
            "`bench/ceiling.py`, an ASGI app that reads the body and answers 204, on the same uvicorn settings "
            "(httptools, uvloop, no access log).",
            "",
            "| body | processes | server | req/s | p50 ms | p99 ms | server CPU µs/req | ceiling req/s | ceiling p50 | "
            "ceiling p99 | ceiling CPU µs/req | of ceiling | errors |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *b.rows,
            "",
            _cpu_paragraph(b, floor),
            "",
            "Fixed offered rate, open loop (latency from each request's due time), ~30 KB call_analyzed:",
            "",
            "| processes | offered req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms | non-204 |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *b.notes,
            "",
            f"Memory: {soak_line}.",
            "",
            f"Every 204 is on a topic: {b.acked:,} deliveries answered 204, {on_topics:,} messages on the topics "
            f"({'OK' if on_topics >= b.acked else 'MISSING MESSAGES'}; more on the topics is possible: a request "
            "in flight when wrk stops is stored without wrk counting it).",
            "",
        ]
    )


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    wrk = ensure_wrk()
    with kafka() as bootstrap:
        b = prepare(args, wrk, bootstrap)
        warm = warm_up(b)
        floor = {kind: mandated_us(ps, b.key, b.prefix) for kind, ps in b.payloads.items()}
        for workers in [int(w) for w in args.workers.split(",")]:
            ceil = ceiling_cells(b, workers)
            for fast in [True, False] if args.compare_fastapi and workers == 1 else [True]:
                gateway_cells(b, workers, fast, ceil)
        soak_line = soak(b)
        time.sleep(1)
        on_topics = topic_total(bootstrap, b.prefix) - warm
    text = section(b, floor, soak_line, on_topics)
    print(text)
    if not args.no_write:
        write_section("gateway", text)
        say(f"wrote the Gateway section of {RESULTS.relative_to(REPO)}")
    if on_topics < b.acked:
        sys.exit("some deliveries answered 204 are not on their topics")


if __name__ == "__main__":
    main()
