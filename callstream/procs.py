"""Starting a process and waiting until it answers: one helper for `up`, the tests, the stress scripts
and the benchmarks.

A `Process` owns a child started with its output in a log file. `wait_http` polls a URL until a
check passes and fails fast, quoting the log's tail, when the child exits first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from kernel.errors import CallstreamError


class ProcessFailed(CallstreamError):
    """A started process exited, or did not answer in time."""


def answered(r: httpx.Response) -> bool:
    """The default readiness check: anything but a server error."""
    return r.status_code < 500


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_http(
        self, path: str, timeout: float = 60.0, ok: Callable[[httpx.Response], bool] = answered
    ) -> httpx.Response:
        """Poll `url + path` until `ok(response)`; raise `ProcessFailed` if the process exits first."""
        if not self.url:
            raise ProcessFailed(f"{self.name} has no URL to wait for")
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProcessFailed(
                    f"{self.name} exited with code {self.proc.returncode}; see {self.log}:\n{self.output()[-4000:]}"
                )
            try:
                r = httpx.get(self.url + path, timeout=2.0)
                if ok(r):
                    return r
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.2)
        raise ProcessFailed(
            f"{self.name} did not answer {path} in {timeout:.0f}s (last: {last}); see {self.log}:\n"
            f"{self.output()[-4000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the process and wait for it; kill it when it outlives `timeout`. Returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def rss_mb(self) -> float:
        """Resident memory of the process and its children."""
        return sum(_rss_kb(p) for p in tree(self.proc.pid)) / 1024

    def cpu_s(self) -> float:
        """User and system CPU seconds of the process and its children so far."""
        return sum(_cpu_ticks(p) for p in tree(self.proc.pid)) / os.sysconf("SC_CLK_TCK")


def spawn(
    name: str,
    cmd: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    url: str | None = None,
) -> Process:
    """Start `cmd` with stdout and stderr appended to `log` and no stdin."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            list(cmd),
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
        )
    return Process(name, proc, log, url)


def callstream(
    name: str,
    args: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    url: str | None = None,
) -> Process:
    """Start `python -m callstream <args>` with this interpreter."""
    return spawn(name, [sys.executable, "-m", "callstream", *args], log, env, cwd, url)


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out += tree(int(k))
    return out


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime
