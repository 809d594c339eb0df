"""`callstream s3 start|status|stop`: a real S3Proxy that a real S3 client writes to and reads from."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.fs as pafs

from callstream.localkafka import free_port
from tests.support.paths import REPO


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callstream", "s3", *args], env=env, capture_output=True, text=True, timeout=180
    )


def test_s3_start_serves_buckets_on_loopback_until_stopped(tmp_path, monkeypatch):
    port = str(free_port())
    env = {**os.environ, "CALLSTREAM_S3_CACHE": str(REPO / ".s3proxy" / "jars")}
    home = ["--port", port, "--home", str(tmp_path / "s3")]
    started = _cli("start", *home, env=env)
    try:
        assert started.returncode == 0, started.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        assert _cli("status", *home, env=env).returncode == 0
        assert _cli("start", *home, env=env).returncode == 0  # idempotent
        for k, v in exports.items():
            monkeypatch.setenv(k, v)
        s3 = pafs.S3FileSystem(
            access_key=exports["AWS_ACCESS_KEY_ID"],
            secret_key=exports["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=exports["AWS_ENDPOINT_URL"],
            region="us-east-1",
            allow_bucket_creation=True,
        )
        s3.create_dir("probe")
        with s3.open_output_stream("probe/hello.txt") as f:
            f.write(b"hello")
        assert s3.open_input_stream("probe/hello.txt").read() == b"hello"
        assert (tmp_path / "s3" / f"s3-{port}" / "data" / "probe" / "hello.txt").read_bytes() == b"hello"
    finally:
        stopped = _cli("stop", *home, env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    status = _cli("status", *home, env=env)
    assert status.returncode == 1 and "not running" in status.stdout
