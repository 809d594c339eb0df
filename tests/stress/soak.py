"""`make soak`: the realistic mix through the whole stack for an hour, a fault every five minutes, an audit.

`callstream simulate` sends 500 events/s of its realistic mix (duplicates, reordering, Retell's 10 s
timeout and 3 retries) to one gateway running two processes (`--workers 2`); two workers share the
partitions and one sink loads DuckDB and Parquet, on a broker of the soak's own. Every
`--fault-every` seconds, in turn:

  worker   SIGKILL worker A; started again at once, as a supervisor would
  sink     SIGKILL the sink; started again at once
  gateway  SIGKILL one of the gateway's two processes; uvicorn's supervisor starts another
  broker   stop the broker, 20 s later start it again; nothing else is touched: the gateway
           answers 503 meanwhile (the simulator retries, then gives up), workers and sink heal alone

Each fault's heal is measured: when the process was back (worker ready, sink writing its status
file, the new gateway process serving, the broker answering), the longest pause in the 204s around
it, and when the consumer lag of the workers or the sink fell back to its level before the fault.

Then the audit (tests/support/stackaudit.py): every 204 on its topic; the workers' totals equal to
the distinct events the topics hold; one DuckDB row per analyzed call and chat with exact child
rows; Parquet equal to DuckDB; each alert once on its topic and once at the webhook receiver. Each
process's RSS is taken every minute; the goal is that after minute 10 none grows by more than 10%.
The report (audit, faults, RSS per minute, growth) is printed, goes to --report, and with --results
(for a run of 60 minutes or more) to the Soak section of bench/RESULTS.md. Exit status 1 when a
check of the audit fails; the work folder (logs, DuckDB, the broker's data) is then kept.

    python -m tests.stress.soak                                   # `make soak`: 60 min at 500/s
    python -m tests.stress.soak --minutes 5 --fault-every 60      # a short run
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import KafkaException

from callstream.procs import Process
from callstream.sim.record import Acknowledged, read_record
from kernel.lag import GroupLag, LagUnavailable
from tests.stress.soak_report import report
from tests.stress.soak_stack import SERVICES, WORKERS, Stack, simulator
from tests.support.audit import stored_offsets
from tests.support.expected import Stored, read_alerts, read_stored
from tests.support.rss import RssLog
from tests.support.stackaudit import Check, acknowledged_on_topics, alerts_once, warehouse, worker_totals

FAULTS = ("worker", "sink", "gateway", "broker")
LAG_EVERY_S = 2.0
HEAL_TIMEOUT_S = 600.0
# Caught up: the lag back to at most twice its median over the two minutes before the fault (and at
# least this many messages, for a lag that was about zero).
LAG_FLOOR = 50
# The sink has loaded what there is when its record count stays put this long while it writes its status.
SINK_IDLE_S = 20.0


@dataclass
class Options:
    minutes: float = 60.0
    rate: float = 500.0
    fault_every: float = 300.0
    broker_down: float = 20.0
    sample_every: float = 60.0
    warmup: float = 600.0
    catch_up: float = 900.0
    seed: int = 1
    processes: int = 1
    work: Path | None = None
    keep: bool = False
    report: Path | None = None
    results: bool = False


@dataclass
class Fault:
    n: int
    kind: str
    at: float  # seconds after the start
    detail: str = ""
    done: float | None = None  # the fault's action finished (the process killed and started again)
    back: float | None = None  # the process is back (or the broker answers)
    down: float | None = None  # broker: stopped
    restarted: float | None = None  # broker: started again
    gateway_ready: float | None = None  # broker: the gateway's /readyz answers 200 again
    caught_up: dict[str, float | None] = field(default_factory=dict)  # "workers" / "sink" -> when
    thresholds: dict[str, int] = field(default_factory=dict)
    pause: tuple[float, float] | None = None  # the longest stretch without a 204 around it
    killed_wall: float | None = None  # worker: wall-clock time its SIGKILL had taken effect


@dataclass
class Lag:
    at: float
    workers: int | None
    sink: int | None


@dataclass
class Traffic:
    acked: int = 0  # acknowledged deliveries (lines of the record)
    times: list[float] = field(default_factory=list)  # each 204, seconds after the start, in order
    missing: list[Acknowledged] = field(default_factory=list)
    summary: str = ""
    exit_code: int | None = None


@dataclass
class Outcome:
    """Everything the report needs."""

    opts: Options
    stack: Stack
    started_wall: float
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float] | None = None
    seconds: float = 0.0  # of traffic
    startup_s: float = 0.0
    audit_s: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    lags: list[Lag] = field(default_factory=list)
    rss: RssLog = field(default_factory=RssLog)
    surprises: list[str] = field(default_factory=list)
    traffic: Traffic = field(default_factory=Traffic)
    checks: list[Check] = field(default_factory=list)
    catch_up_s: dict[str, float] = field(default_factory=dict)
    stored: Stored | None = None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def schedule(opts: Options) -> list[Fault]:
    """The faults in turn, every `fault_every` seconds, while the traffic runs."""
    out: list[Fault] = []
    at = opts.fault_every
    while at < opts.minutes * 60:
        out.append(Fault(len(out) + 1, FAULTS[len(out) % len(FAULTS)], at))
        at += opts.fault_every
    return out


class Soak:
    def __init__(self, opts: Options, work: Path) -> None:
        self.opts = opts
        self.stack = Stack(work)
        self.out = Outcome(opts, self.stack, time.time(), os.getloadavg())
        self.t0 = time.time()
        self.sim: Process | None = None
        self.done = threading.Event()
        self.watchers: list[threading.Thread] = []

    def now(self) -> float:
        return time.time() - self.t0

    def say(self, text: str) -> None:
        print(f"[soak {self.now() / 60:5.1f} min] {text}", flush=True)

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> Outcome:
        opts, stack = self.opts, self.stack
        self.say(f"starting a broker, the gateway (2 processes), {len(WORKERS)} workers and the sink in {stack.work}")
        began = time.time()
        stack.start_all()
        record = stack.work / "acked.tsv"
        self.t0 = time.time()
        self.out.startup_s = self.t0 - began
        self.out.started_wall = self.t0
        self.sim = simulator(stack, opts.minutes * 60, opts.rate, record, opts.seed, opts.processes)
        self.say(f"traffic: {opts.rate:.0f} events/s for {opts.minutes:g} min (prefix {stack.prefix})")
        monitor = threading.Thread(target=self._monitor, name="soak-monitor", daemon=True)
        monitor.start()
        for fault in schedule(opts):
            self._sleep_until(fault.at)
            self.out.faults.append(fault)
            self._fault(fault)
        self.out.traffic.exit_code = self._wait_simulator()
        self.out.seconds = self.now()
        self.rss_sample()
        self.say("traffic over; stopping the gateway, then auditing")
        stack.stop("gateway")
        self._audit(record)
        self.out.audit_s = self.now() - self.out.seconds
        self.done.set()
        monitor.join(timeout=30)
        for w in self.watchers:
            w.join(timeout=1)
        self.out.load_end = os.getloadavg()
        return self.out

    def _sleep_until(self, at: float) -> None:
        while (left := at - self.now()) > 0:
            time.sleep(min(left, 1.0))
            if self.sim is not None and not self.sim.alive():
                return

    def _wait_simulator(self) -> int:
        assert self.sim is not None
        try:
            code = self.sim.proc.wait(timeout=max(0.0, self.opts.minutes * 60 - self.now()) + 600)
        except Exception:
            self.sim.stop(signal.SIGTERM)
            code = -1
        out = self.sim.output()
        self.out.traffic.summary = out[out.find("sent ") :].strip() if "sent " in out else out[-3000:]
        return int(code)

    # -- watching ----------------------------------------------------------------------------------

    def rss_sample(self) -> None:
        self.out.rss.sample(self.now(), self.stack.pids(self.sim))

    def _monitor(self) -> None:
        stack = self.stack
        workers = GroupLag(stack.bootstrap, stack.worker_group(), timeout_s=3)
        sink = GroupLag(stack.bootstrap, stack.sink_group(), timeout_s=3)
        next_rss = 0.0
        while not self.done.is_set():
            self._watch_processes()
            self.out.lags.append(
                Lag(self.now(), _lag(workers, stack.event_topics()), _lag(sink, stack.analyzed_topics()))
            )
            if self.now() >= next_rss:
                self.rss_sample()
                next_rss += self.opts.sample_every
                self._progress()
            self.done.wait(LAG_EVERY_S)

    def _progress(self) -> None:
        """A line per RSS sample: the lags and each process's RSS, so a long run shows how it goes."""
        lag = self.out.lags[-1]
        rss = ", ".join(
            f"{role} {life[-1].samples[-1].mb:.0f}"
            for role, life in self.out.rss.roles.items()
            if life and life[-1].samples and life[-1].samples[-1].at >= self.now() - LAG_EVERY_S * 2
        )
        self.say(f"lag: workers {lag.workers}, sink {lag.sink}; RSS MB: {rss}")

    def _watch_processes(self) -> None:
        """A service that exits on its own is a finding; it is started again so the run goes on."""
        stack = self.stack
        for name in SERVICES:
            with stack.lock:
                proc = stack.procs.get(name)
                if proc is None or proc.alive() or name in stack.expected_exit:
                    continue
                tail = proc.output()[-1500:]
                self.out.surprises.append(
                    f"{name} exited with code {proc.proc.returncode} at {self.now() / 60:.1f} min; "
                    f"the end of its log:\n{tail}"
                )
                self.say(f"{name} exited on its own (code {proc.proc.returncode}); starting it again")
                stack.start(name)

    def _watch(self, fault: Fault, back: Any) -> None:
        """Run `back()` (which waits and returns when the process is back) in a thread."""

        def wait() -> None:
            try:
                fault.back = back()
            except Exception as exc:
                fault.detail += f"; not back: {exc}"

        t = threading.Thread(target=wait, name=f"heal-{fault.n}", daemon=True)
        t.start()
        self.watchers.append(t)

    def _until(self, check: Any, timeout: float = HEAL_TIMEOUT_S) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return self.now()
            time.sleep(0.2)
        raise TimeoutError(f"not within {timeout:.0f}s")

    # -- faults --------------------------------------------------------------------------------------

    def _fault(self, f: Fault) -> None:
        stack = self.stack
        self.say(f"fault {f.n}: {f.kind}")
        if f.kind == "worker":
            stack.kill("worker A")
            f.killed_wall = time.time()
            stack.start("worker A")
            f.done = self.now()
            f.detail = "worker A killed and started again"
            self._watch(f, lambda: self._until(lambda: stack.ready("worker A")))
        elif f.kind == "sink":
            stack.kill("sink")
            restarted = time.time()
            stack.start("sink")
            f.done = self.now()
            f.detail = "sink killed and started again"
            self._watch(f, lambda: stack.wait_sink_status(restarted, HEAL_TIMEOUT_S) - self.t0)
        elif f.kind == "gateway":
            served = stack.gateway_started()
            pid = stack.kill_gateway_process(0)
            f.done = self.now()
            f.detail = f"gateway process {pid} killed"

            def replaced() -> bool:
                slots = stack.gateway_slots()
                return None not in slots and pid not in slots and stack.gateway_started() > served

            self._watch(f, lambda: self._until(replaced))
        else:
            stack.broker.stop(say=lambda _: None)
            f.down = self.now()
            time.sleep(self.opts.broker_down)
            f.restarted = self.now()
            stack.start_broker()
            f.back = f.done = self.now()
            f.detail = (
                f"broker stopped (took {f.down - f.at:.1f} s), started again {f.restarted - f.down:.0f} s later, "
                f"answering {f.back - f.restarted:.1f} s after that"
            )

            def gateway_ready() -> None:
                with contextlib.suppress(TimeoutError):
                    f.gateway_ready = self._until(lambda: _answers(f"{stack.gateway_url}/readyz"))

            t = threading.Thread(target=gateway_ready, daemon=True)
            t.start()
            self.watchers.append(t)

    # -- the end -------------------------------------------------------------------------------------

    def _audit(self, record: Path) -> None:
        out, stack = self.out, self.stack
        acked: set[int] = set()
        times = []
        for a in read_record(record):
            acked.add(int(a.digest, 16))
            times.append(a.at_ms / 1000 - self.t0)
        times.sort()
        out.traffic.acked, out.traffic.times = len(times), times
        self.say(f"reading the topics back ({len(times):,} acknowledged deliveries)")
        try:
            stored = read_stored(stack.bootstrap, stack.prefix, acked)
        except AssertionError as exc:
            out.checks.append(Check("the topics read back", False, str(exc)))
            return
        out.stored = stored
        out.traffic.missing = [a for a in read_record(record) if int(a.digest, 16) in acked]
        out.checks.append(acknowledged_on_topics(out.traffic.acked, out.traffic.missing))
        for part, audit in (("workers", self._worker_audit), ("alerts", self._alert_audit), ("sink", self._sink_audit)):
            try:
                out.checks += audit(stored)
            except AssertionError as exc:  # what the audit helpers assert on the way: a finding, reported
                out.checks.append(Check(f"the audit of the {part}", False, str(exc)[:2000]))
        out.checks.append(
            Check(
                "no service exited on its own",
                not out.surprises,
                "none" if not out.surprises else "; ".join(s.splitlines()[0] for s in out.surprises),
            )
        )
        for f in out.faults:
            if f.back is None:
                out.checks.append(Check(f"fault {f.n} ({f.kind}) healed", False, f.detail))

    def _worker_audit(self, stored: Stored) -> list[Check]:
        want = stored.worker_counts()
        self.say("waiting for the workers to count every stored event")
        url = self.stack.worker_url("worker B")
        started = time.monotonic()
        counts: dict[str, Any] | None = None
        while time.monotonic() - started < self.opts.catch_up:
            counts = _get(f"{url}/api/counts")
            if counts and counts.get("complete") and {k: int(v) for k, v in counts["events"].items()} == want:
                break
            time.sleep(2)
        self.out.catch_up_s["workers"] = time.monotonic() - started
        return worker_totals(counts, _get(f"{url}/api/metrics?minutes=1"), stored)

    def _alert_audit(self, stored: Stored) -> list[Check]:
        stack = self.stack
        started = time.monotonic()
        while time.monotonic() - started < 120:  # the last alerts on their way to the receiver
            log = read_alerts(stack.bootstrap, stack.prefix)
            received = {str(b.get("alert", {}).get("id")) for b in stack.receiver.received()}
            if set(log.ids) <= received:
                break
            time.sleep(3)
        time.sleep(3)
        stack.stop(*WORKERS)
        log = read_alerts(stack.bootstrap, stack.prefix)
        throttle = stored.rules.failure_rate.throttle_minutes
        kills = [f.killed_wall for f in self.out.faults if f.killed_wall is not None]
        return alerts_once(log, stack.receiver.deliveries(), stored.owed_alerts, throttle, kills)

    def _sink_audit(self, stored: Stored) -> list[Check]:
        """Let the sink load up to the topics' end, stop it (its last Parquet snapshot is published on
        the way out), and audit the warehouse. The sink's Kafka-committed offsets are only for
        operators, so DuckDB's own offsets say whether it is done: when it stopped short, it is
        started again, until `catch_up` runs out."""
        stack = self.stack
        self.say("waiting for the sink to load every analyzed call")
        ends = {tp: end for tp, end in stored.ends.items() if tp[0] in stack.analyzed_topics()}
        started = time.monotonic()
        while True:
            self._wait_sink_idle(started + self.opts.catch_up)
            stack.stop("sink", timeout=180)
            loaded = stored_offsets(stack.db) or {}
            short = {tp: (loaded.get(tp, 0), end) for tp, end in ends.items() if loaded.get(tp, 0) < end}
            if not short or time.monotonic() > started + self.opts.catch_up:
                break
            self.say(f"the sink stopped short of the topics' end ({short}); starting it again")
            stack.start("sink")
        self.out.catch_up_s["sink"] = time.monotonic() - started
        lag = _lag(GroupLag(stack.bootstrap, stack.sink_group(), timeout_s=10), stack.analyzed_topics())
        checks = warehouse(stack.db, stack.parquet, stored)
        checks.append(
            Check(
                "the sink's lag, as Kafka reports it to operators, is 0 once it has loaded everything",
                lag == 0,
                f"{lag} messages" if lag is not None else "Kafka did not say",
            )
        )
        return checks

    def _wait_sink_idle(self, deadline: float) -> None:
        """Until the sink's group lag is 0, or its record count has not moved for SINK_IDLE_S while it
        keeps writing its status file (a commit to Kafka lost in a broker outage leaves a lag behind)."""
        lag = GroupLag(self.stack.bootstrap, self.stack.sink_group(), timeout_s=10)
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if _lag(lag, self.stack.analyzed_topics()) == 0:
                return
            records, written = _status(self.stack.status_file)
            if records != last:
                last, since = records, time.monotonic()
            elif time.monotonic() - since >= SINK_IDLE_S and time.time() - written < 10:
                return
            time.sleep(2)


def _lag(group: GroupLag, topics: list[str]) -> int | None:
    try:
        return sum(group.query(group.partitions(topics)).values())
    except (LagUnavailable, KafkaException):
        return None


def _status(path: Path) -> tuple[int, float]:
    """The sink's record count (since it started) and when it last wrote its status file (-1, 0: none)."""
    try:
        return int(json.loads(path.read_text())["records"]), path.stat().st_mtime
    except (OSError, ValueError, KeyError):
        return -1, 0.0


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _get(url: str) -> dict[str, Any] | None:
    try:
        r = httpx.get(url, timeout=10)
        return r.json() if r.status_code == 200 else None  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError):
        return None


# -- heal times, from what was recorded ----------------------------------------------------------


def heal(out: Outcome) -> None:
    """Each fault's catch-up and longest pause in 204s, from the lag samples and the record, looked for
    until the next fault (a heal not seen by then is left open)."""
    for i, f in enumerate(out.faults):
        until = out.faults[i + 1].at if i + 1 < len(out.faults) else float("inf")
        since = f.back if f.back is not None else f.done
        groups = {"worker": ["workers"], "sink": ["sink"], "broker": ["workers", "sink"]}.get(f.kind, [])
        for g in groups:
            f.thresholds[g] = _threshold(out.lags, g, f.at)
            caught = _first_at_most(out.lags, g, since, f.thresholds[g])
            f.caught_up[g] = caught if caught is not None and caught < until else None
        end = max([t for t in (f.back, *f.caught_up.values()) if t is not None] or [f.at]) + 5
        f.pause = _longest_pause(out.traffic.times, f.at - 1, min(end, until, out.seconds))


def _values(lags: list[Lag], group: str) -> list[tuple[float, int | None]]:
    return [(x.at, x.workers if group == "workers" else x.sink) for x in lags]


def _threshold(lags: list[Lag], group: str, before: float) -> int:
    seen = [v for at, v in _values(lags, group) if before - 120 <= at < before and v is not None]
    return max(LAG_FLOOR, int(2 * statistics.median(seen))) if seen else LAG_FLOOR


def _first_at_most(lags: list[Lag], group: str, since: float | None, threshold: int) -> float | None:
    if since is None:
        return None
    return next((at for at, v in _values(lags, group) if at >= since and v is not None and v <= threshold), None)


def _longest_pause(times: list[float], start: float, end: float) -> tuple[float, float] | None:
    """The longest stretch in [start, end] without a 204: (from, to), seconds after the start."""
    inside = times[bisect.bisect_left(times, start) : bisect.bisect_right(times, end)]
    if not inside:
        return (start, end)
    edges = [start, *inside, end]
    return max(itertools.pairwise(edges), key=lambda ab: ab[1] - ab[0])


# -- main ----------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0, help="minutes of traffic (default 60)")
    ap.add_argument("--rate", type=float, default=500.0, help="events per second (default 500)")
    ap.add_argument("--fault-every", type=float, default=300.0, help="seconds between faults (default 300)")
    ap.add_argument("--broker-down", type=float, default=20.0, help="seconds the broker stays stopped (default 20)")
    ap.add_argument("--sample-every", type=float, default=60.0, help="seconds between RSS samples (default 60)")
    ap.add_argument("--warmup", type=float, default=600.0, help="RSS growth counts from here, seconds (default 600)")
    ap.add_argument("--catch-up", type=float, default=900.0, help="longest wait for catch-up at the end, seconds")
    ap.add_argument("--seed", type=int, default=1, help="the simulator's seed (default 1)")
    ap.add_argument("--processes", type=int, default=1, help="the simulator's sender processes (default 1)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, DuckDB, broker data)")
    ap.add_argument("--report", type=Path, default=None, help="also write the report (markdown) here")
    ap.add_argument(
        "--results", action="store_true", help="put the report of a 60-minute run in bench/RESULTS.md (section Soak)"
    )
    a = ap.parse_args(argv)
    return Options(
        minutes=a.minutes,
        rate=a.rate,
        fault_every=a.fault_every,
        broker_down=a.broker_down,
        sample_every=a.sample_every,
        warmup=a.warmup,
        catch_up=a.catch_up,
        seed=a.seed,
        processes=a.processes,
        work=a.work,
        keep=a.keep,
        report=a.report,
        results=a.results,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    work = opts.work or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    soak = Soak(opts, work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))  # so that `finally` stops what it started
    try:
        out = soak.run()
    finally:
        soak.done.set()
        soak.stack.stop_all()
        if soak.sim is not None:
            soak.sim.stop(signal.SIGTERM, timeout=10)
    heal(out)
    text = report(out)
    if opts.report:
        opts.report.parent.mkdir(parents=True, exist_ok=True)
        opts.report.write_text(text)
    if opts.results and opts.minutes >= 60:
        from bench.report import RESULTS, write_section

        write_section("soak", text)
        print(f"the report is in {RESULTS}, section Soak", flush=True)
    elif opts.results:
        print("a run shorter than 60 minutes: bench/RESULTS.md left as it was", flush=True)
    print(text, flush=True)
    if not opts.keep and not out.failed:
        shutil.rmtree(work, ignore_errors=True)
    elif out.failed:
        print(f"kept the work folder for a look: {work}", flush=True)
    return 1 if out.failed else 0


if __name__ == "__main__":
    sys.exit(main())
