"""What every benchmark writes beside its numbers: the machine, and its own section of RESULTS.md."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from callstream.localkafka import KAFKA_VERSION, LocalKafka, free_port

log = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """Cores, CPU model, RAM, OS and Python, as the results tables state them."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    ram = "unknown RAM"
    with contextlib.suppress(OSError, AttributeError):
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        ram = f"{kb / 1024 / 1024:.0f} GiB RAM"
    return (
        f"{os.cpu_count()} cores ({cpu}), {ram}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def load_note(before: float, after: float) -> str:
    """The 1-minute load average around a run, and whether other work shared the cores: judged by the
    load at the start, since at the end it counts the benchmark's own processes."""
    cores = os.cpu_count() or 1
    shared = (
        "other work shared the cores, so treat wall-clock figures as a floor"
        if before > 0.5 * cores
        else "nothing else ran"
    )
    return f"Load average {before:.1f} at the start, {after:.1f} at the end ({shared})"


def write_section(name: str, text: str) -> None:
    """Replace this benchmark's section of RESULTS.md (between its markers), or append it."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    RESULTS.write_text(new.rstrip("\n") + "\n")


def bench_broker(home: Path) -> LocalKafka:
    """A broker of the benchmark's own (not started): free ports, a 1 GiB heap, the jars `make` fetched."""
    jars = Path(__file__).resolve().parents[1] / ".kafka" / "jars" / KAFKA_VERSION
    return LocalKafka(home=home, port=free_port(), controller_port=free_port(), heap="1g", jars=jars)


@contextlib.contextmanager
def bench_kafka(bootstrap: str | None, home: Path, say: Callable[[str], None] = log.info) -> Iterator[str]:
    """`bootstrap` when one is given; else a broker of the run's own under `home`, stopped when the block ends."""
    if bootstrap:
        yield bootstrap
        return
    broker = bench_broker(home)
    broker.start(wait=120, say=say)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@contextlib.contextmanager
def bench_workdir(prefix: str) -> Iterator[Path]:
    """A temporary folder for one run (under BENCH_TMP if set), deleted when the block ends."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("BENCH_TMP")))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
