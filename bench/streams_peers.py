"""The rows beside the worker: what one Python process can read, what it can read and decode, and a
quixstreams application computing the same per-agent totals (bench/quix_app.py, as its own process).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from bench.streams_mix import Expected, compare
from kernel.catalogue import EVENT_NAMES, topic
from streams.calls import decode_body

REPO = Path(__file__).resolve().parents[1]
QUIX_VENV = REPO / "bench" / "out" / "quix-venv"
PARTITIONS = 3
# Tried in this order; the best is the quixstreams row (consumer_poll_timeout, seconds; 1.0 is its default).
QUIX_POLL_TIMEOUTS = (1.0, 0.1, 0.01, 0.001)


@dataclass
class Row:
    """One processor's run over one mix."""

    processor: str
    rate: float  # messages/s, from the first message processed to the last
    cpu_us: float  # process CPU (all threads) per message over the same span
    check: str
    note: str = ""


def _consumer(bootstrap: str, prefix: str) -> Consumer:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            # librdkafka stops fetching a partition for fetch.queue.backoff.ms (1 s by default) each
            # time its prefetch queue is full, so a loop slower than the fetcher (any that decodes)
            # would be measured idle most of the time.
            "fetch.queue.backoff.ms": 10,
        }
    )
    c.assign([TopicPartition(topic(prefix, e), p, 0) for e in EVENT_NAMES for p in range(PARTITIONS)])
    return c


def consume_loop(bootstrap: str, prefix: str, exp: Expected, *, decode: bool) -> Row:
    """confluent-kafka's consume() in batches of 1000; with `decode`, every body through the worker's
    decoder (`streams.calls.decode_body`) too, tallied per agent and event to check nothing was lost."""
    c = _consumer(bootstrap, prefix)
    by_topic: Counter[str] = Counter()
    raw: Counter[tuple[str, str]] = Counter()
    got = first = 0
    t0 = c0 = 0.0
    try:
        while got < exp.messages:
            # Never more than are left: consume() waits for as many as asked (or its timeout).
            batch = c.consume(num_messages=min(1000, exp.messages - got), timeout=1.0)
            for m in batch:
                if m.error() is not None:
                    continue
                got += 1
                by_topic[m.topic() or ""] += 1
                value = m.value() or b""
                if decode:
                    body = decode_body(value)
                    subject = body.call or body.chat
                    raw[((subject.agent_id if subject else None) or "unknown", body.event)] += 1
            if not t0 and got:
                # The clock starts once the first batch is through (connecting and the first fetch
                # are not reading); its messages are left out of the rate.
                t0, c0, first = time.perf_counter(), time.process_time(), got
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        c.close()
    if decode:
        check = "exact (messages per agent and event)" if raw == exp.raw else "NOT exact (messages per agent and event)"
        name = "consume loop + `decode_body` (ceiling of a Python processor)"
    else:
        check = "exact (messages per topic)" if by_topic == exp.by_topic else "NOT exact (messages per topic)"
        name = "plain confluent-kafka consume loop (ceiling for reading)"
    return Row(name, (got - first) / dt, 1e6 * cpu / (got - first), check)


def quix_python(say: Callable[[str], None]) -> Path:
    """The Python of a venv of its own with quixstreams (the `bench-quix` extra) and msgspec.

    Not the project's venv: quixstreams pins older confluent-kafka and pydantic, which would
    change the libraries the gateway and the worker are measured on. The app imports the
    project's modules from the checkout (PYTHONPATH).
    """
    python = QUIX_VENV / "bin" / "python"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["optional-dependencies"]["bench-quix"]]
    wanted += [d for d in project["dependencies"] if re.match(r"msgspec\b", d)]
    stamp = QUIX_VENV / "installed.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == "\n".join(wanted):
        return python
    say(f"installing {', '.join(wanted)} into {QUIX_VENV} ...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(QUIX_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=True)
    stamp.write_text("\n".join(wanted))
    return python


def quix_once(
    python: Path, bootstrap: str, prefix: str, exp: Expected, poll_timeout: float, tmp: Path, *, json_body: bool = False
) -> tuple[float, float, str]:
    """One run of bench/quix_app.py with a fresh consumer group and state dir: (rate, CPU µs, check)."""
    group = f"benchquix-{uuid.uuid4().hex[:8]}"
    log = tmp / f"{group}.log"
    with log.open("wb") as err:
        out = subprocess.run(
            [
                str(python),
                "-m",
                "bench.quix_app",
                "--bootstrap",
                bootstrap,
                "--prefix",
                prefix,
                "--group",
                group,
                "--messages",
                str(exp.messages),
                "--poll-timeout",
                str(poll_timeout),
                "--state-dir",
                str(tmp / group),
                *(["--json"] if json_body else []),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            timeout=1800,
            check=False,
        )
    if out.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"the quixstreams app failed (exit {out.returncode}):\n{tail}")
    result = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return result["rate"], result["cpu_us"], compare(exp.totals, result["totals"])


def quix(python: Path, bootstrap: str, prefix: str, exp: Expected, tmp: Path, timeouts: tuple[float, ...]) -> Row:
    """The quixstreams app once per poll timeout; the fastest run is the row, the others its note."""
    runs = {t: quix_once(python, bootstrap, prefix, exp, t, tmp) for t in timeouts}
    best = max(runs, key=lambda t: runs[t][0])
    rate, cpu, check = runs[best]
    others = ", ".join(f"{t:g} s: {runs[t][0]:,.0f}/s" for t in timeouts if t != best)
    bad = [f"{t:g} s: {runs[t][2]}" for t in timeouts if runs[t][2] != "exact"]
    # What quixstreams does out of the box with JSON: its own deserializer, every field of the body.
    j_rate, _, j_check = quix_once(python, bootstrap, prefix, exp, best, tmp, json_body=True)
    if j_check != "exact":
        bad.append(f"JSON: {j_check}")
    note = (
        f"consumer_poll_timeout {best:g} s"
        + (f" (tried {others})" if others else "")
        + "; with quixstreams' JSON deserializer instead of "
        f"`decode_body`: {j_rate:,.0f}/s" + ("; " + "; ".join(bad) if bad else "")
    )
    return Row("quixstreams app: per-call dedupe, per-agent totals", rate, cpu, check, note)
