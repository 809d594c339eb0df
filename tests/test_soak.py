"""The soak script (`make soak`) for three minutes, so that it cannot rot: the same script as the hour-long
run, at a rate this shared machine keeps up with and a fault every 36 s, so that each of the four
faults (worker, sink, gateway process, broker) happens once. It fails only when a check of its audit
fails or a fault never heals; heal times and memory are reported, never asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.mark.timeout(1200)  # a loaded machine catches up slowly; the run itself is about four minutes
def test_three_minutes_of_traffic_with_every_fault_pass_the_audit(tmp_path: Path) -> None:
    report = tmp_path / "soak.md"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.stress.soak",
            "--minutes",
            "3",
            "--rate",
            "100",
            "--fault-every",
            "36",
            "--sample-every",
            "30",
            "--catch-up",
            "300",
            "--work",
            str(tmp_path / "work"),
            "--report",
            str(report),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=1100)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the script stops every process it started on SIGTERM
        stdout, stderr = proc.communicate(timeout=120)
    text = report.read_text() if report.exists() else ""
    assert proc.returncode == 0, f"{text or stdout[-5000:]}\n{stderr[-5000:]}"
    assert "**Audit: passed.**" in text
    faults = re.findall(r"^\| \d+ \| \d+:\d\d \| (\w+) \|", text, re.M)
    assert faults == ["worker", "sink", "gateway", "broker"], text
    assert "Traceback" not in stderr, stderr[-5000:]
