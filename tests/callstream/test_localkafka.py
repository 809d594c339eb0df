"""`callstream kafka start|stop|status` runs a real broker and leaves no JVM behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from callstream.localkafka import KAFKA_VERSION, broker_answers, free_port
from tests.support.paths import REPO

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _cli(*args: str, home: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CALLSTREAM_KAFKA_HOME": str(home),
        "CALLSTREAM_KAFKA_CACHE": str(REPO / ".kafka" / "jars"),
        "CALLSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
    }
    return subprocess.run(
        [sys.executable, "-m", "callstream", "kafka", *args], env=env, capture_output=True, text=True, timeout=180
    )


def _java_pids(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return out.split()


def test_start_is_idempotent_and_stop_leaves_no_java(tmp_path: Path):
    port = free_port()
    first = _cli("start", home=tmp_path, port=port)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "ready" in first.stdout
    assert broker_answers(f"127.0.0.1:{port}")
    assert (tmp_path / f"broker-{port}" / "logs" / "server.log").stat().st_size > 0, "the broker logs nothing"

    again = _cli("start", home=tmp_path, port=port)
    assert again.returncode == 0 and "already running" in again.stdout

    status = _cli("status", home=tmp_path, port=port)
    assert status.returncode == 0 and "running" in status.stdout

    marker = str(tmp_path / f"broker-{port}")
    assert _java_pids(marker), "no broker JVM found"
    stop = _cli("stop", home=tmp_path, port=port)
    assert stop.returncode == 0, stop.stderr
    assert _java_pids(marker) == []
    assert _cli("status", home=tmp_path, port=port).returncode == 1


def _start_with_path(tmp_path: Path, path: Path) -> subprocess.CompletedProcess[str]:
    """`callstream kafka start` with only `path` on PATH and an empty jar cache."""
    env = {
        **os.environ,
        "PATH": str(path),
        "CALLSTREAM_KAFKA_HOME": str(tmp_path / "k"),
        "CALLSTREAM_KAFKA_CACHE": str(tmp_path / "empty-cache"),
        "CALLSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
    }
    return subprocess.run(
        [sys.executable, "-m", "callstream", "kafka", "start"], env=env, capture_output=True, text=True, timeout=60
    )


def test_start_says_what_to_do_without_java(tmp_path: Path):
    r = _start_with_path(tmp_path, tmp_path)
    assert r.returncode != 0
    assert "java" in r.stderr and "docker compose up -d kafka" in r.stderr


def test_version_is_kafka_4():
    assert KAFKA_VERSION.split(".")[0] == "4"


def test_start_says_what_to_do_without_maven(tmp_path: Path):
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(shutil.which("java"))
    r = _start_with_path(tmp_path, bin_dir)
    assert r.returncode != 0
    assert "mvn" in r.stderr and "Maven" in r.stderr and "docker compose up -d kafka" in r.stderr
