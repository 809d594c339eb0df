"""`callstream up` runs the whole stack, shows data, and Ctrl-C leaves nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from callstream.localkafka import free_port
from tests.support.paths import REPO

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = (int(x) for x in line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_up_stops_everything_it_started_when_its_stdout_pipe_is_gone(tmp_path: Path, sig: signal.Signals):
    """`make up | tee up.log`, then Ctrl-C: tee dies first, so every line `up` prints on its way out
    hits a closed pipe. The broker and the services must stop all the same."""
    kafka_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka_port}",
        CALLSTREAM_KAFKA_HOME=str(tmp_path / "kafka"),
        CALLSTREAM_KAFKA_CACHE=str(REPO / ".kafka" / "jars"),
        PYTHONUNBUFFERED="1",
    )
    args = ["up", "--calls", "10", "--rate", "200", "--gateway-port", str(free_port()), "--web-port", str(free_port())]
    with open(tmp_path / "up.stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "callstream", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    started: list[int] = []
    try:
        assert proc.stdout is not None
        seen = b""
        for line in proc.stdout:  # ends when up exits; the test's timeout bounds it
            seen += line
            if b"press Ctrl-C" in line:
                break
        assert b"press Ctrl-C" in seen, (
            seen.decode(errors="replace")[-2000:] + (tmp_path / "up.stderr").read_text()[-2000:]
        )
        started = _descendants(proc.pid)
        broker = int((tmp_path / "kafka" / f"broker-{kafka_port}" / "broker.pid").read_text())
        assert broker in started and len(started) >= 4  # the broker, gateway, worker, sink
        proc.stdout.close()  # the reader goes away, as tee does on Ctrl-C
        proc.send_signal(sig)
        proc.wait(timeout=90)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in started):
            time.sleep(0.2)
        survivors = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in started if _alive(p)}
        assert survivors == {}, f"left running: {survivors}\n{(tmp_path / 'up.stderr').read_text()[-3000:]}"
        assert "Traceback" not in (tmp_path / "up.stderr").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in started:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_up_starts_its_own_broker_loads_calls_and_ctrl_c_stops_everything(tmp_path: Path):
    kafka_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_"))}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{kafka_port}",
        CALLSTREAM_KAFKA_HOME=str(tmp_path / "kafka"),
        CALLSTREAM_KAFKA_CACHE=str(REPO / ".kafka" / "jars"),
        # A locked read side: up's summary still reads the worker's counts.
        CALLSTREAM_DASHBOARD_TOKENS="up-dashboard-token-0123456789",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "callstream",
                "up",
                "--calls",
                "40",
                "--rate",
                "300",
                "--gateway-port",
                str(free_port()),
                "--web-port",
                str(free_port()),
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and "press Ctrl-C" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.5)
        text = log.read_text()
        assert "press Ctrl-C" in text, text[-4000:]
        assert "made a local key" in text
        assert "Starting Kafka" in text
        summary = text[text.index("Summary") :]
        rows = int(summary.split("rows in `calls`:")[1].split()[0])
        counted = int(summary.split("events counted by the worker:")[1].split()[0])
        assert rows > 0 and counted > 0, summary
        children = _descendants(proc.pid)
        assert len(children) >= 3  # gateway, worker, sink

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        time.sleep(0.5)
        alive = [p for p in children if Path(f"/proc/{p}").exists()]
        assert alive == [], f"left running: {alive}"
        assert subprocess.run(["pgrep", "-f", str(tmp_path / "kafka")], capture_output=True).stdout == b""
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["pkill", "-9", "-f", str(tmp_path / "kafka")], check=False)

    con = duckdb.connect(str(tmp_path / "data" / "warehouse.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM calls").fetchone()[0] == rows
