"""`make bench-history`: a month of traffic through one `callstream worker`, in simulated time.

The benchmark keeps the clock: day after day, calls of the simulator's generator (bench/history_traffic.py)
are produced straight to the topics with `received_at` and the bodies' timestamps from that clock,
the month ending now. The real worker (default settings: a call's state lives 6 h after its analysis,
24 h otherwise) reads them as they come; the benchmark waits for it at the end of each day. At the
checkpoint days (1, 7, 15 and 30 by default) it records:

- the worker's RSS (VmRSS) and its live keys (calls and windows, from `/api/state`);
- the state changelog's size on the broker: the bytes of its partitions' log segments in the broker's
  data folder (what a recovery reads: the compacted part, and what the log cleaner has not reached);
- the restart: the worker is killed with SIGKILL and a new one started; the time until it answers
  `/readyz` with the totals it had (every field of `/api/metrics` `overall`), and of that the recovery
  (Faust's log, from "Restoring state" to "Recovery complete"). A restart includes the group's session
  timeout (10 s): the dead worker keeps its partitions until the broker gives up on it.

The totals are checked against what was produced at every checkpoint. Uses a broker of its own (the
changelog's size is read from its data folder); writes the history section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from bench.history_traffic import DAY_MS, Sent, Traffic
from bench.report import bench_broker, load_note, machine, write_section
from bench.streams_worker import cpu_seconds, worker_env
from callstream.localkafka import KAFKA_VERSION, LocalKafka, free_port
from kernel.catalogue import all_topics
from kernel.topics import wait_for_topics
from streams.settings import WorkerSettings
from streams.topics import CHANGELOG_CONFIG
from streams.worker import Worker

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 3
# The event topics keep a few days of this traffic per partition (the worker is never more than a day
# behind: the benchmark waits for it every day), so a month fits on the disk.
EVENT_TOPIC_CONFIG = {"retention.bytes": str(512 * 1024 * 1024), "segment.bytes": str(64 * 1024 * 1024)}
# The broker's settings of the changelog that count wall-clock time, scaled to the simulated clock
# (a simulated hour passes in seconds here): how long tombstones stay after compaction (an hour in
# production), and how soon a segment closes for the cleaner (10 minutes). The worker keeps values
# set on the topic; the others are its own (streams/topics.py).
CHANGELOG_SCALED = {"delete.retention.ms": "5000", "segment.ms": "5000", "max.compaction.lag.ms": "60000"}
GOAL = 1.5  # day 30 within 1.5x of day 1: RSS and restart time


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


@contextlib.contextmanager
def own_broker(tmp: Path) -> Iterator[LocalKafka]:
    signal.signal(signal.SIGTERM, _stop)
    kafka = bench_broker(tmp / "kafka")
    kafka.start(wait=120, say=say)
    try:
        yield kafka
    finally:
        kafka.stop()


@dataclass
class Row:
    day: int
    calls: int  # produced so far
    rss_mb: float
    live_calls: int
    live_windows: int
    changelog_mb: float
    restart_s: float
    recovery_s: float | None
    exact: str


class WorkerProc:
    """One `callstream worker` process of the run."""

    def __init__(self, env: dict[str, str], tmp: Path, n: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"worker-{n}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "callstream", "worker", "--web-port", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def get(self, path: str) -> Any:
        return httpx.get(f"{self.url}{path}", timeout=30).json()

    def overall(self) -> dict[str, Any] | None:
        """The group's totals, once the worker is ready and answers for every partition."""
        try:
            if httpx.get(f"{self.url}/readyz", timeout=5).status_code != 200:
                return None
            m = self.get("/api/metrics?minutes=1")
        except (httpx.HTTPError, ValueError):
            return None
        return dict(m["overall"]) if m["complete"] else None

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"the worker exited; see {self.log}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def recovery_s(self) -> float | None:
        """Seconds from Faust's "Restoring state" to its "Recovery complete", from the log."""
        stamps: dict[str, float] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            for mark in ("Restoring state from changelog topics", "Recovery complete"):
                if mark in line and mark not in stamps:
                    found = re.match(r"\[(\d+-\d+-\d+ \d+:\d+:\d+,\d+)\]", line)
                    if found:
                        at = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
                        stamps[mark] = at.timestamp()
        if len(stamps) < 2:
            return None
        return stamps["Recovery complete"] - stamps["Restoring state from changelog topics"]


def counted(overall: dict[str, Any]) -> int:
    return sum(overall["events"].values())


def exactness(overall: dict[str, Any], sent: Sent) -> str:
    """'exact' when the totals show every call, chat and distinct event produced and nothing late."""
    got = (overall["calls"], overall["chats_started"], counted(overall), overall["late_events"])
    want = (sent.calls, sent.chats, sent.events, 0)
    return "exact" if got == want else f"NOT exact: calls, chats, events, late {got}, expected {want}"


def wait_caught_up(worker: WorkerProc, sent: Sent, timeout: float = 1800) -> dict[str, Any]:
    """Until the worker counted every distinct event produced; its totals then."""
    deadline, last, last_change = time.monotonic() + timeout, -1, time.monotonic()
    while True:
        worker.check_alive()
        overall = worker.overall()
        n = counted(overall) if overall is not None else -1
        if overall is not None and n >= sent.events:
            return overall
        if n != last:
            last, last_change = n, time.monotonic()
        if time.monotonic() > deadline or time.monotonic() - last_change > 300:
            late = overall["late_events"] if overall is not None else "?"
            raise SystemExit(f"the worker is stuck at {n:,} of {sent.events:,} events ({late} late); see {worker.log}")
        time.sleep(0.5)


def changelog_bytes(kafka: LocalKafka, name: str) -> int:
    return sum(f.stat().st_size for d in kafka.data_dir.glob(f"{name}-*") for f in d.glob("*.log"))


def restart(
    worker: WorkerProc, env: dict[str, str], tmp: Path, n: int, want: dict[str, Any]
) -> tuple[WorkerProc, float]:
    """SIGKILL `worker`, start another; it and the seconds until it is ready with the totals `want`."""
    worker.kill()
    t0 = time.monotonic()
    fresh = WorkerProc(env, tmp, n)
    told = t0
    while True:
        fresh.check_alive()
        got = fresh.overall()
        if got == want:
            return fresh, time.monotonic() - t0
        if got is not None and time.monotonic() - told > 30:
            told = time.monotonic()
            say(f"  the restarted worker is ready but its totals differ (before, now): {_diff(want, got)}")
        if time.monotonic() - t0 > 600:
            fresh.kill()
            raise SystemExit(
                f"the restarted worker did not show the totals within 10 min (before, now: {_diff(want, got)}); "
                f"see {fresh.log}"
            )
        time.sleep(0.1)


def _diff(want: dict[str, Any], got: dict[str, Any] | None) -> dict[str, Any]:
    got = got or {}
    return {k: (want.get(k), got.get(k)) for k in sorted({*want, *got}) if got.get(k) != want.get(k)}


def make_topics(bootstrap: str, prefix: str, changelog: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(t, PARTITIONS, 1, config=EVENT_TOPIC_CONFIG) for t in all_topics(prefix)]
    new.append(NewTopic(changelog, PARTITIONS, 1, config={**CHANGELOG_CONFIG, **CHANGELOG_SCALED}))
    for fut in admin.create_topics(new).values():
        fut.result(timeout=30)
    wait_for_topics(bootstrap, [*all_topics(prefix), changelog])


def run(args: argparse.Namespace, tmp: Path, kafka: LocalKafka) -> tuple[list[Row], dict[str, float]]:
    prefix = f"hist{uuid.uuid4().hex[:8]}"
    changelog = Worker(WorkerSettings(topic_prefix=prefix, kafka_bootstrap=kafka.bootstrap)).topics.changelog
    make_topics(kafka.bootstrap, prefix, changelog)
    env = {**worker_env(kafka.bootstrap, prefix, tmp), "CALLSTREAM_LOG_LEVEL": "INFO"}
    end = int(time.time() * 1000)
    traffic = Traffic(kafka.bootstrap, prefix, end - end % DAY_MS - args.days * DAY_MS, args.calls_per_day)
    worker, restarts, rows = WorkerProc(env, tmp, 0), 0, []
    cpu0, t0, busy = cpu_seconds(worker.proc.pid), time.monotonic(), {"cpu": 0.0, "seconds": 0.0}
    try:
        for day in range(1, args.days + 1):
            started = time.monotonic()
            traffic.day(day)
            if day == args.days:
                traffic.finish()
            overall = wait_caught_up(worker, traffic.sent)
            now = worker.get("/api/state")
            say(
                f"day {day}: {traffic.sent.calls + traffic.sent.chats:,} calls and chats, {traffic.sent.events:,} "
                f"events so far; {time.monotonic() - started:.0f} s; worker RSS {worker.rss_mb():.0f} MB, "
                f"{now['calls']:,} call states, {now['windows']:,} windows, outbox {now['outbox']}"
            )
            if day not in args.checkpoints:
                continue
            busy["cpu"] += cpu_seconds(worker.proc.pid) - cpu0
            busy["seconds"] += time.monotonic() - t0
            state = worker.get("/api/state")
            rss = worker.rss_mb()
            size = changelog_bytes(kafka, changelog)
            restarts += 1
            worker, took = restart(worker, env, tmp, restarts, overall)
            rows.append(
                Row(
                    day,
                    traffic.sent.calls + traffic.sent.chats,
                    rss,
                    state["calls"],
                    state["windows"],
                    size / 1e6,
                    took,
                    worker.recovery_s(),
                    exactness(overall, traffic.sent),
                )
            )
            say(f"  checkpoint: {rows[-1]}")
            cpu0, t0 = cpu_seconds(worker.proc.pid), time.monotonic()
    finally:
        worker.kill()
    busy["events"] = traffic.sent.events
    busy["messages"] = traffic.sent.messages
    busy["bytes"] = traffic.sent.bytes
    return rows, busy


def table(rows: list[Row]) -> str:
    lines = [
        "| day | calls and chats so far | worker RSS MB | live call states | live windows | changelog on the broker MB "
        "| restart after SIGKILL, s | of it recovery, s | totals |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        rec = f"{r.recovery_s:.2f}" if r.recovery_s is not None else "n/a"
        lines.append(
            f"| {r.day} | {r.calls:,} | {r.rss_mb:.0f} | {r.live_calls:,} | {r.live_windows:,} | {r.changelog_mb:.1f} "
            f"| {r.restart_s:.1f} | {rec} | {r.exact} |"
        )
    return "\n".join(lines) + "\n"


def goals(rows: list[Row]) -> str:
    if len(rows) < 2:
        return ""
    first, last = rows[0], rows[-1]
    rss, took = last.rss_mb / first.rss_mb, last.restart_s / first.restart_s
    verdict = {True: "met", False: "not met"}
    return (
        f"Goals (day {last.day} within {GOAL:g}x of day {first.day}): RSS {rss:.2f}x ({verdict[rss <= GOAL]}), "
        f"restart time {took:.2f}x ({verdict[took <= GOAL]})."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=int, default=30, help="simulated days")
    ap.add_argument("--calls-per-day", type=int, default=50_000, help="calls and chats a simulated day")
    ap.add_argument("--checkpoints", default="1,7,15,30", help="days to measure and restart at (comma-separated)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--keep", type=Path, help="a folder to keep the broker's and workers' files and logs in")
    args = ap.parse_args()
    args.checkpoints = {int(d) for d in args.checkpoints.split(",") if int(d) <= args.days} | {args.days}
    load_before = os.getloadavg()
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        d = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-history-")))
        kafka = stack.enter_context(own_broker(d))
        rows, busy = run(args, d, kafka)
    load_after = os.getloadavg()
    minutes = (time.monotonic() - t0) / 60
    text = "\n".join(
        [
            f"`make bench-history` on {started}; {machine()}. One Kafka {KAFKA_VERSION} broker on the same machine, "
            f"{PARTITIONS} partitions per topic, lz4. {load_note(load_before[0], load_after[0])}. "
            f"{args.days} simulated days at "
            f"{args.calls_per_day:,} calls and chats a day, {busy['events']:,.0f} distinct events in "
            f"{busy['messages']:,.0f} messages (1 % redelivered), mean body "
            f"{busy['bytes'] / busy['messages'] / 1024:.1f} KB; "
            f"the run took {minutes:.0f} min. The worker spent {1e6 * busy['cpu'] / max(1, busy['events']):.0f} µs "
            "of CPU per event (all threads, between checkpoints). Worker settings: the defaults (a call's state "
            "lives 6 h after its analysis, 24 h without one; windows 24 h).\n",
            table(rows),
            goals(rows),
        ]
    )
    print(text)
    if not args.no_write:
        write_section("history", f"## History: a month of traffic\n\n{text}")


if __name__ == "__main__":
    main()
