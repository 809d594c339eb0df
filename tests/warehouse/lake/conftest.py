"""Fixtures of the lake tests: a real PostgreSQL and a real S3Proxy per session, a lake per test
(embedded: SQLite + a folder; shared: PostgreSQL + S3), and the lake sink as a process."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from callstream.localpostgres import Postgres, pg_bin, start_postgres
from callstream.locals3 import LocalS3
from tests.support.s3 import start_s3
from warehouse.lake.catalog import LakeCatalog, open_catalog_from


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql)")
    pg = start_postgres()
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(pg.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    server = start_s3(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def embedded_lake(tmp_path: Path) -> dict[str, str]:
    """The variables of an embedded lake: a SQLite catalog and a local folder."""
    return {
        "CALLSTREAM_LAKE_WAREHOUSE": str(tmp_path / "lake"),
        "CALLSTREAM_LAKE_CATALOG": f"sqlite:///{tmp_path / 'lake' / 'catalog.db'}",
    }


@pytest.fixture
def shared_lake(postgres: Postgres, s3_server: LocalS3) -> dict[str, str]:
    """The variables of a lake for several machines: PostgreSQL catalog, S3 warehouse (a namespace
    and a folder of this test's own)."""
    ns = f"t{uuid.uuid4().hex[:10]}"
    return {
        "CALLSTREAM_LAKE_WAREHOUSE": f"s3://lake/{ns}",
        "CALLSTREAM_LAKE_CATALOG": postgres.url,
        "CALLSTREAM_LAKE_NAMESPACE": ns,
        **s3_server.env(),
    }


@pytest.fixture
def lake_catalog() -> Iterator[Callable[[dict[str, str]], LakeCatalog]]:
    """The catalog of a lake given by its variables, opened in the test process."""
    opened: list[LakeCatalog] = []

    def open_(env: dict[str, str]) -> LakeCatalog:
        cat = open_catalog_from(env)
        opened.append(cat)
        return cat

    yield open_
    for c in opened:
        c.engine.dispose()


@pytest.fixture
def run_lake_sink(service_env: dict[str, str], tmp_path: Path) -> Callable[..., str]:
    """`callstream sink --until-caught-up` into a lake, as a process, to completion; returns its output."""

    def run(lake: dict[str, str], **env: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "callstream", "sink", "--until-caught-up"],
            env={**service_env, "CALLSTREAM_LAKE_BATCH_MAX_SECONDS": "0.5", **lake, **env},
            cwd=tmp_path,
            capture_output=True,
            timeout=240,
        )
        out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, out[-4000:]
        return out

    return run
