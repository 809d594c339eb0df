"""Where `callstream worker` spends its CPU per event, by stage: `python -m bench.profile_worker`.

For each mix (small events; call_analyzed bodies of about 26 KB) the topics are pre-filled, a real
worker process starts, and once it is ready `py-spy record --threads --format raw` samples it
while it drains them. Each sample's stack is put in one stage by its innermost frame that says
which (see `stage_of`: by package, and for the worker's own modules by the source line, so that
a renamed function still lands right). Samples of a thread waiting (in epoll, a queue, a sleep or
a blocking librdkafka call) are left out, and each thread's samples are weighted so that they add
up to the CPU time the kernel counted for that thread over the same span (/proc/<pid>/task): on a
shared machine a sampled thread may be waiting for a core, and py-spy cannot tell. Threads with no
Python stack (librdkafka's) are a stage of their own.

Prints per mix: CPU share and µs per event of each stage, and the functions with the most time.
Writes the stage table to the streams section of bench/RESULTS.md ("Profile").
"""

from __future__ import annotations

import argparse
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import msgspec
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from bench.report import machine, write_section
from bench.streams import broker, fresh_topics, say
from bench.streams_mix import MIXES, Mix, prefill
from bench.streams_peers import PARTITIONS
from bench.streams_worker import Drain, counted, running, wait_ready, worker_env
from callstream.localkafka import free_port

_TICK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parents[1]


def py_spy() -> str:
    """py-spy from this venv (installed into it on first use), else from PATH."""
    here = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if here is None and shutil.which("py-spy") is None:
        say("installing py-spy into this venv ...")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
        here = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    return here or shutil.which("py-spy") or "py-spy"


# The stages, in the order the table lists them.
FETCH = "fetch and record parsing (aiokafka: network, lz4, record batches)"
FAUST = "Faust's consumer: each fetch handed to the worker, acks (the changelog's messages in a recovery)"
LOOP = "event loop (uvloop: callbacks, futures, sockets)"
ADAPT = "worker: record -> EventMessage (headers)"
DECODE = "decoding the body (`decode_body`)"
STATE = "per-call state change (state read/decode, `apply_event`, batch)"
METRICS = "metrics (`Effects` into the books' Aggs)"
CHANGELOG = "changelog writes (encode, table, producer)"
COMMIT = "offset commits and group coordination"
ALERTS = "alerts (rules; the outbox: publish, post, tombstone)"
WEB = "web server and JSON API (the benchmark's polls)"
NATIVE = "native threads (librdkafka: the alert feed's consumer; libuv's)"
OTHER = "other"
STAGES = (FETCH, FAUST, LOOP, ADAPT, DECODE, STATE, METRICS, CHANGELOG, COMMIT, ALERTS, WEB, NATIVE, OTHER)

# Source text of a leaf line that blocks (the thread is waiting, not working).
_WAITING = re.compile(r"\.(consume|poll|select|wait|get|acquire|sleep|join)\(|time\.sleep\(|work_queue\.get")
_WAITING_FUNCS = {
    ("selectors.py", "select"),
    ("threading.py", "wait"),
    ("threading.py", "_wait_for_tstate_lock"),
    ("queue.py", "get"),
    ("thread.py", "_worker"),
}


class Frame(NamedTuple):
    func: str
    file: str
    line: int

    def text(self) -> str:
        return linecache.getline(self.file, self.line) if self.line > 0 else ""


_RAW = ("--format", "raw", "-o")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\d+)\)(: (?P<name>.*))?")


def parse_frame(text: str) -> Frame:
    m = _FRAME.match(text)
    if m is None:
        return Frame(text, "", 0)
    return Frame(m["func"].rpartition(".")[2], m["file"], int(m["line"]))


_STREAMS_MODULES = {
    "calls.py": STATE,
    "metrics.py": METRICS,
    "alerts.py": ALERTS,
    "alertrules.py": ALERTS,
    "web.py": WEB,
    "groupview.py": WEB,
    "readiness.py": WEB,
}


def _streams_stage(f: Frame) -> str | None:
    """The worker's own modules: by module, and in the processor by what the line does."""
    mod = f.file.rpartition("/streams/")[2]
    if mod in _STREAMS_MODULES:
        return _STREAMS_MODULES[mod]
    if mod == "table_store.py":
        return STATE if f.func == "get" else CHANGELOG
    if mod == "faust_internals.py":
        return CHANGELOG if f.func == "remember_partition" else FAUST
    if mod == "worker.py":
        return ADAPT if f.func == "_event_message" or "_event_message(" in f.text() else FAUST
    if mod == "processor.py":
        return _processor_stage(f)
    return None


def _processor_stage(f: Frame) -> str:
    text = f.text()
    if "decode_body(" in text:
        return DECODE
    if f.func in ("_apply", "apply_to") or "_apply(" in text:
        return METRICS
    if f.func == "_commit" or "_enc.encode(" in text or "store.put(" in text:
        return CHANGELOG
    if f.func == "_alert" or "on_alert(" in text:
        return ALERTS
    return STATE


def _aiokafka_stage(f: Frame) -> str | None:
    if "/producer/" in f.file:
        return CHANGELOG
    if "/consumer/fetcher.py" in f.file:
        return FETCH
    if "/consumer/group_coordinator.py" in f.file:
        return COMMIT
    return None  # the connection, protocol and records: the caller says what for


def _faust_stage(f: Frame) -> str | None:
    if "commit" in f.func or f.func == "_handle_attached":
        return COMMIT
    if "/faust/web/" in f.file:
        return WEB
    if "/faust/tables/" in f.file or "/faust/stores/" in f.file:
        return None  # the caller (the table store) says whether it is a read or a write
    if "producer" in f.file or (f.file.endswith("/drivers/aiokafka.py") and f.func in ("send", "send_and_wait")):
        return CHANGELOG
    return FAUST


def _frame_stage(f: Frame) -> str | None:
    path = f.file
    if "/streams/" in path and "site-packages" not in path:
        return _streams_stage(f)
    if "/aiokafka/" in path:
        return _aiokafka_stage(f)
    if "/faust/" in path or "/mode/" in path:
        return _faust_stage(f)
    if "/aiohttp/" in path or "/httpx/" in path or "/yarl/" in path:
        return WEB
    return None


# The event loop's dispatch: frames above it (the Faust worker that runs the loop) say nothing
# about the callback or task step below.
_DISPATCH = {("events.py", "_run"), ("base_events.py", "_run_once"), ("base_events.py", "run_forever")}
# Where mode runs an event loop (Faust's consumer thread's, and the worker's own): under uvloop,
# which runs in C, the loop's callbacks and task steps sit right below these.
_RUNNERS = {("threads.py", "_start_thread"), ("worker.py", "execute_from_commandline")}


def stage_of(frames: list[Frame]) -> str:
    """The stage of one stack (root first): the innermost frame that tells, below the loop's dispatch."""
    if frames and (Path(frames[-1].file).name, frames[-1].func) in _RUNNERS:
        # uvloop runs in C: nothing below the call that runs it is Python, so this is the loop's own
        # work; on Faust's consumer thread (a mode ServiceThread) its sockets carry the fetches.
        return FETCH if frames[-1].file.endswith("/mode/threads.py") else LOOP
    if any(f.file.endswith("/streams/outbox.py") for f in frames):
        return ALERTS  # its sends and tombstones too: an alert's delivery, not a batch's writes
    for f in reversed(frames):
        if (Path(f.file).name, f.func) in _DISPATCH or (Path(f.file).name, f.func) in _RUNNERS:
            return _loop_stage(frames)
        stage = _frame_stage(f)
        if stage is not None:
            return stage
    return OTHER


def _loop_stage(frames: list[Frame]) -> str:
    """A callback of the loop itself (socket reads and writes, futures, handles). On Faust's consumer
    thread (a mode ServiceThread) its sockets carry the fetches (and the group's few requests)."""
    if any(f.file.endswith("/mode/threads.py") for f in frames) and any(
        "/aiokafka/" in f.file or f.file.endswith(("/asyncio/selector_events.py", "/asyncio/streams.py"))
        for f in frames
    ):
        return FETCH
    return LOOP


def waiting(leaf: Frame) -> bool:
    name = Path(leaf.file).name
    return (name, leaf.func) in _WAITING_FUNCS or bool(_WAITING.search(leaf.text()))


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of `pid`: its name and user+system CPU seconds."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
            out[int(task.name)] = ((task / "comm").read_text().strip(), (int(fields[11]) + int(fields[12])) / _TICK)
        except (OSError, ValueError):
            continue
    return out


class Capture(msgspec.Struct):
    """What one profiled drain recorded (saved with --save, analysed again with --load)."""

    mix: str
    described: str
    messages: float  # processed between the two thread readings
    seconds: float
    before: dict[int, tuple[str, float]]  # thread id -> (name, CPU seconds)
    after: dict[int, tuple[str, float]]
    raw: str  # py-spy's raw stacks
    header: str = ""  # when, where, load average
    rate: int = 0  # py-spy samples per second
    messages_total: int = 0  # all messages of the mix
    changelog_messages: int = 0  # what the worker wrote to its state changelog over the whole drain
    changelog_bytes: int = 0


@dataclass
class Profile:
    """CPU seconds of one drain by stage and by leaf function."""

    capture: Capture
    cpu: float = 0.0  # the process's CPU over the span
    samples: int = 0
    stages: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    threads: list[tuple[str, float, int]] = field(default_factory=list)  # name, CPU seconds, working samples
    functions: defaultdict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))

    @property
    def name(self) -> str:
        return self.capture.mix

    def us(self, seconds: float) -> float:
        return 1e6 * seconds / self.capture.messages

    def by_thread(self) -> str:
        """CPU per event of the busiest threads: the event loop's (MainThread) bounds the rate."""
        top = sorted(self.threads, key=lambda t: -t[1])[:2]
        return "CPU µs/event by thread: " + ", ".join(f"{name} {self.us(cpu):.0f}" for name, cpu, _ in top)

    def changelog_per_event(self) -> str:
        """Changelog messages and bytes per message of the mix (the whole drain, both counted)."""
        c, n = self.capture, self.capture.messages_total
        if not n:
            return "not recorded"
        return f"{c.changelog_messages / n:.2f} messages, {c.changelog_bytes / n:,.0f} bytes"


def _working_stacks(raw: str) -> tuple[defaultdict[int, list[tuple[list[Frame], int]]], dict[int, str]]:
    """Each thread's stacks that were not waiting, with their sample counts; the threads' Python names."""
    stacks: defaultdict[int, list[tuple[list[Frame], int]]] = defaultdict(list)
    names: dict[int, str] = {}
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        parts = stack.split(";")
        m = _THREAD.match(parts[0])
        if m is None or not n.isdigit():
            continue
        tid = int(m["tid"])
        names[tid] = m["name"] or ""
        frames = [parse_frame(p) for p in parts[1:]]
        if frames and not waiting(frames[-1]):
            stacks[tid].append((frames, int(n)))
    return stacks, names


def analyse(capture: Capture) -> Profile:
    """Spread each thread's CPU over its working samples, by stage and by leaf function."""
    prof = Profile(capture)
    stacks, names = _working_stacks(capture.raw)
    for tid, (comm, end) in capture.after.items():
        cpu = end - capture.before.get(tid, (comm, 0.0))[1]
        name = names.get(tid) or comm
        prof.cpu += cpu
        samples = stacks.get(tid, [])
        total = sum(n for _, n in samples)
        prof.samples += total
        prof.threads.append((name, cpu, total))
        if not total:
            prof.stages[NATIVE if comm.startswith(("rdk:", "libuv", "uvloop")) else OTHER] += cpu
            continue
        for frames, n in samples:
            share = cpu * n / total
            prof.stages[stage_of(frames)] += share
            leaf = frames[-1]
            prof.functions[(leaf.func, f"{_short(leaf.file)}:{leaf.line}")] += share
    return prof


def _short(path: str) -> str:
    """A frame's file without the venv or the checkout in front."""
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _py_spy(pid: int, rate: int, out: Path) -> subprocess.Popen[bytes]:
    spy = subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--threads", "--full-filenames", *_RAW, str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # py-spy says nothing when its stderr is not a terminal; attaching takes well under a second.
    time.sleep(1.0)
    if spy.poll() is not None:
        raise SystemExit(f"py-spy could not attach: {spy.communicate()[1].decode(errors='replace')[:500]}")
    return spy


def changelog_volume(bootstrap: str, prefix: str) -> tuple[int, int]:
    """Messages and key+value bytes on the worker's state changelog (the one topic of the prefix Faust named)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if prefix in t and t.endswith("-changelog")]
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{prefix}-changelog", "enable.auto.commit": False})
    tps = [TopicPartition(t, p, 0) for t in names for p in range(PARTITIONS)]
    end = sum(c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps)
    c.assign(tps)
    n = size = 0
    while n < end:
        batch = c.consume(num_messages=min(1000, end - n), timeout=5.0)
        if not batch:
            break
        for m in batch:
            if m.error() is None:
                n += 1
                size += len(m.key() or b"") + len(m.value() or b"")
    c.close()
    return n, size


def capture_mix(bootstrap: str, mix: Mix, events: int, rate: int, tmp: Path) -> Capture:
    """Pre-fill `mix`, start a worker, and sample it with py-spy while it drains the topics."""
    prefix = fresh_topics(bootstrap, mix.name)
    say(f"[{mix.name}] pre-filling {events:,} messages ...")
    exp = prefill(bootstrap, prefix, mix, events)
    say(f"[{mix.name}] {exp.describe()}")
    port = free_port()
    url, log, raw = f"http://127.0.0.1:{port}", tmp / f"worker-{prefix}.log", tmp / f"{prefix}.raw"
    with running(["worker", "--web-port", str(port)], worker_env(bootstrap, prefix, tmp), log) as proc:
        wait_ready(url, proc, log)
        spy = _py_spy(proc.pid, rate, raw)
        try:
            before, n0, t0 = thread_cpu(proc.pid), max(0, counted(url)), time.perf_counter()
            # Few polls (every 0.5 s), so that the web server's share stays small.
            Drain(url, proc, log, exp.distinct).wait(every=0.5)
            after, t1 = thread_cpu(proc.pid), time.perf_counter()
        finally:
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
    if n0 >= exp.distinct:
        raise SystemExit(f"[{mix.name}] the worker drained the topics before py-spy started: pre-fill more events")
    messages = (exp.distinct - n0) * exp.messages / exp.distinct
    cl_messages, cl_bytes = changelog_volume(bootstrap, prefix)
    return Capture(
        mix=mix.name,
        described=exp.describe(),
        messages=messages,
        seconds=t1 - t0,
        before=before,
        after=after,
        raw=raw.read_text(),
        rate=rate,
        messages_total=exp.messages,
        changelog_messages=cl_messages,
        changelog_bytes=cl_bytes,
    )


def stage_table(profiles: list[Profile]) -> str:
    head = "| stage | " + " | ".join(f"{p.name}: % CPU | {p.name}: µs/event" for p in profiles) + " |"
    lines = [head, "| --- |" + " ---: | ---: |" * len(profiles)]
    for stage in STAGES:
        if not any(p.stages.get(stage) for p in profiles):
            continue
        cells = " | ".join(f"{p.stages[stage] / p.cpu:.1%} | {p.us(p.stages[stage]):.1f}" for p in profiles)
        lines.append(f"| {stage} | {cells} |")
    totals = " | ".join(f"100% | {p.us(p.cpu):.1f}" for p in profiles)
    lines.append(f"| **whole process** | {totals} |")
    return "\n".join(lines) + "\n"


def details(prof: Profile, n: int = 30) -> str:
    """Per thread, and the functions with the most self time: what the stage table sums up."""
    lines = [f"Threads, {prof.name} (CPU µs/event, working samples):"]
    lines += [
        f"  {prof.us(cpu):6.1f}  {name} ({k})" for name, cpu, k in sorted(prof.threads, key=lambda t: -t[1]) if cpu
    ]
    lines.append(f"Top functions, {prof.name} (self time, µs/event):")
    lines += [
        f"  {prof.us(s):6.1f}  {func} ({where})"
        for (func, where), s in sorted(prof.functions.items(), key=lambda kv: -kv[1])[:n]
    ]
    return "\n".join(lines)


def report(profiles: list[Profile]) -> str:
    first = profiles[0].capture
    mixes = "; ".join(f"**{p.name}** ({MIXES[p.name].description}): {p.capture.described}" for p in profiles)
    runs = "; ".join(
        f"{p.name}: {p.capture.messages / p.capture.seconds:,.0f} events/s under the profiler (py-spy pauses the "
        f"process for every sample), {p.samples:,} working samples, {p.by_thread()}, changelog writes per event: "
        f"{p.changelog_per_event()}"
        for p in profiles
    )
    return (
        f"### Profile\n\n{first.header} A real `callstream worker` drains pre-filled topics under "
        f"`py-spy record --threads` at {first.rate} Hz; each working sample goes to the stage of its innermost "
        "telling frame, and each thread's samples are scaled to the CPU the kernel counted for that thread, "
        f"so the µs add up to the process's CPU per event. Mixes: {mixes}. {runs}.\n\n{stage_table(profiles)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=60_000, help="messages pre-filled per mix of large events")
    ap.add_argument(
        "--small-events",
        type=int,
        default=300_000,
        help="messages pre-filled for the small mix (the worker reads a few seconds' worth before py-spy attaches)",
    )
    ap.add_argument("--mixes", default="small,analyzed", help=f"comma-separated, of {', '.join(MIXES)}")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--save", type=Path, help="keep each mix's capture (stacks, thread CPU) in this folder")
    ap.add_argument("--load", type=Path, help="analyse the captures saved in this folder instead of running")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    names = args.mixes.split(",")
    if args.load:
        captures = [msgspec.json.decode((args.load / f"{m}.json").read_bytes(), type=Capture) for m in names]
    else:
        load_before = os.getloadavg()
        started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as d, broker(Path(d)) as bootstrap:
            captures = [
                capture_mix(bootstrap, MIXES[m], args.small_events if m == "small" else args.events, args.rate, Path(d))
                for m in names
            ]
        header = (
            f"`python -m bench.profile_worker` on {started}; {machine()}; load average {load_before[0]:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end."
        )
        for c in captures:
            c.header = header
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            for c in captures:
                (args.save / f"{c.mix}.json").write_bytes(msgspec.json.encode(c))
    profiles = [analyse(c) for c in captures]
    text = report(profiles)
    print(text)
    for p in profiles:
        print(details(p), file=sys.stderr)
    if not args.no_write:
        write_section("streams-profile", text)


if __name__ == "__main__":
    main()
