"""The soak's report, in markdown: the audit, the traffic, the faults and their heal times, the RSS
of every process per minute and its growth after the warm-up."""

from __future__ import annotations

import bisect
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bench.report import machine
from callstream.localkafka import KAFKA_VERSION
from tests.stress.soak_stack import SOAK_TTL_ANALYZED_S, SOAK_TTL_IDLE_S
from tests.support.rss import Growth

if TYPE_CHECKING:
    from tests.stress.soak import Fault, Outcome

# Shown for information, not judged by the memory goal: the broker is Kafka's JVM, the simulator the load.
NOT_JUDGED = ("broker (JVM)", "simulator")
GROWTH_GOAL = 10.0  # percent
ROLES = (
    "gateway (supervisor)",
    "gateway #1",
    "gateway #2",
    "worker A",
    "worker B",
    "sink",
    "broker (JVM)",
    "simulator",
)


def _after(at: float | None, base: float) -> str:
    return "—" if at is None else f"{at - base:.1f} s"


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def report(out: Outcome) -> str:
    return "\n\n".join(
        [
            _head(out),
            _audit(out),
            "**Traffic** (the simulator's own summary):\n\n```\n" + out.traffic.summary.strip() + "\n```",
            _faults(out),
            _rss(out),
            _growth(out),
        ]
    )


def _head(out: Outcome) -> str:
    o = out.opts
    when = datetime.fromtimestamp(out.started_wall, UTC).strftime("%Y-%m-%d %H:%M UTC")
    end = f"{out.load_end[0]:.1f}" if out.load_end else "?"
    command = f"python -m tests.stress.soak --minutes {o.minutes:g} --rate {o.rate:g} --fault-every {o.fault_every:g}"
    return (
        "## Soak\n\n"
        f"`{command}` on {when}; {machine()}. Load average {out.load_start[0]:.1f} at the start, {end} at the "
        "end (other work may have shared the cores).\n\n"
        f"{o.rate:.0f} events/s of `callstream simulate`'s realistic mix (seed {o.seed}) for {o.minutes:g} min "
        "through one gateway (`--workers 2`), two workers and one sink, on a Kafka "
        f"{KAFKA_VERSION} broker of the soak's own (3 partitions per topic); a fault every "
        f"{o.fault_every:g} s in turn: SIGKILL worker A (started again at once), SIGKILL the sink (started "
        "again at once), SIGKILL one of the gateway's two processes (uvicorn starts another), stop the broker "
        f"for {o.broker_down:g} s (nothing else touched). The workers keep a call's state "
        f"{SOAK_TTL_ANALYZED_S / 60:g} min after its analysis and {SOAK_TTL_IDLE_S / 60:g} min otherwise (6 h and 24 h "
        "by default), so that their live state is steady after the warm-up. "
        f"{len(out.faults)} faults in {out.seconds / 60:.1f} min "
        f"of traffic; {out.stack.restarts} restarts by the soak; {out.startup_s:.0f} s to start everything "
        f"before, {out.audit_s:.0f} s of catch-up and audit after."
    )


def _audit(out: Outcome) -> str:
    failed = out.failed
    verdict = "passed" if not failed else f"FAILED ({len(failed)} of {len(out.checks)} checks)"
    rows = [f"| {c.name} | {'ok' if c.ok else '**FAILED**'} | {c.detail} |" for c in out.checks]
    waits = ", ".join(f"{k} {v:.0f} s" for k, v in out.catch_up_s.items())
    return (
        f"**Audit: {verdict}.** Everything is compared with what the topics hold, read back to their end "
        "after the gateway stopped (only 204s count as sent; an event answered 503 may still be stored, "
        f"late). Catch-up after the traffic: {waits}.\n\n"
        "| check | result | detail |\n| --- | --- | --- |\n" + "\n".join(rows)
    )


def _fault_row(f: Fault) -> str:
    pause = "—" if f.pause is None else f"{f.pause[1] - f.pause[0]:.1f} s (from {f.pause[0] - f.at:+.1f} s)"
    caught = {g: _after(f.caught_up.get(g), f.at) if g in f.caught_up else "n/a" for g in ("workers", "sink")}
    notes = [f.detail] + [f"{g} lag ≤ {n:,}" for g, n in f.thresholds.items()]
    if f.gateway_ready is not None:
        notes.append(f"gateway ready at +{f.gateway_ready - f.at:.1f} s")
    return (
        f"| {f.n} | {_mmss(f.at)} | {f.kind} | {_after(f.back, f.at)} | {pause} | {caught['workers']} | "
        f"{caught['sink']} | {'; '.join(notes)} |"
    )


def _faults(out: Outcome) -> str:
    head = (
        "**Faults and how long each took to heal** (seconds after the fault). *Back*: the worker answers "
        "`/readyz` 200, the sink writes its status file, the new gateway process has started serving, the "
        "broker answers. *No 204 for*: the longest stretch without an acknowledged delivery around the "
        "fault. *Caught up*: the consumer group's lag (sampled every 2 s) is back to at most twice its "
        "median over the two minutes before the fault (the note says the bound).\n\n"
        "| # | at | fault | back after | no 204 for | workers caught up after | sink caught up after | note |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    return head + "\n".join(_fault_row(f) for f in out.faults)


def _rss(out: Outcome) -> str:
    every = out.opts.sample_every
    rows = []
    last_pid: dict[str, int] = {}
    roles = [r for r in ROLES if r in out.rss.roles]
    for k in range(math.floor(out.seconds / every) + 1):
        at = k * every
        times = out.traffic.times
        acks = (bisect.bisect_left(times, at) - bisect.bisect_left(times, at - every)) / every if k else 0.0
        lags = [x for x in out.lags if at - every <= x.at < at]
        w = max((x.workers for x in lags if x.workers is not None), default=None)
        s = max((x.sink for x in lags if x.sink is not None), default=None)
        cells = []
        for role in roles:
            sample = out.rss.at(role, at, every / 2)
            if sample is None:
                cells.append("—")
                continue
            mark = "*" if role in last_pid and last_pid[role] != sample.pid else ""
            last_pid[role] = sample.pid
            cells.append(f"{sample.mb:.0f}{mark}")
        lag_cells = f"{'—' if w is None else f'{w:,}'} | {'—' if s is None else f'{s:,}'}"
        rows.append(f"| {at / 60:g} | {acks:.0f} | {lag_cells} | " + " | ".join(cells) + " |")
    head = (
        f"**RSS (MB) every {every:g} s**, each process on its own (a `*`: a new process since the row "
        "before); 204/s and the largest consumer lag of the workers and of the sink in the interval "
        "before the row.\n\n"
        "| minute | 204/s | workers lag | sink lag | " + " | ".join(roles) + " |\n"
        "| " + " | ".join(["---"] * (4 + len(roles))) + " |\n"
    )
    return head + "\n".join(rows)


def _growth_row(g: Growth) -> str:
    if g.percent is None:
        return f"| {g.role} | {g.pid} | — | — | — | — | — | {g.why_not} |"
    assert g.baseline_at is not None and g.end_at is not None
    return (
        f"| {g.role} | {g.pid} | {g.baseline_at / 60:.0f} | {g.baseline_mb:.0f} | {g.end_at / 60:.0f} | "
        f"{g.end_mb:.0f} | {g.peak_mb:.0f} | {g.percent:+.1f}% |"
    )


def _growth(out: Outcome) -> str:
    warmup = out.opts.warmup
    growth = out.rss.growth(warmup)
    judged = [g for g in growth if g.role not in NOT_JUDGED and g.percent is not None]
    over = [g for g in judged if (g.percent or 0) > GROWTH_GOAL]
    if not judged:
        verdict = f"not judged: no process lived {warmup / 60:g} min past minute {warmup / 60:g} with two samples"
    elif over:
        verdict = "not met: " + ", ".join(f"{g.role} (pid {g.pid}) {g.percent:+.1f}%" for g in over)
    else:
        verdict = f"met by all {len(judged)} judged processes (largest {max(g.percent or 0 for g in judged):+.1f}%)"
    return (
        f"**Growth after minute {warmup / 60:g}**, per process: from its first sample past minute {warmup / 60:g} "
        f"of the run and of its own life, to its last. Goal: none grows by more than {GROWTH_GOAL:g}% "
        f"(the broker's JVM and the simulator are shown for information): **{verdict}**.\n\n"
        "| process | pid | from min | MB | to min | MB | peak MB | growth |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(_growth_row(g) for g in growth)
    )
