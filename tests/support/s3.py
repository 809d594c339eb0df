"""A real S3 server for the tests: S3Proxy as `callstream s3 start` runs it, on a free port in a
temporary folder (the jars are cached in the repo's .s3proxy/ folder, fetched with Maven once)."""

from __future__ import annotations

from pathlib import Path

from callstream.localkafka import free_port
from callstream.locals3 import S3PROXY_VERSION, LocalS3
from tests.support.paths import REPO


def start_s3(home: Path) -> LocalS3:
    server = LocalS3(home=home, port=free_port(), jars=REPO / ".s3proxy" / "jars" / S3PROXY_VERSION)
    server.start(wait=120)
    return server
