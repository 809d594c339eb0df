"""The notebooks run, top to bottom, against a warehouse built from simulated traffic by the real sink."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.support.paths import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture(scope="module")
def built_warehouse(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str) -> tuple[Path, set[str]]:
    """Simulated calls and chats of several days, loaded by `callstream sink --until-caught-up`; and
    every phone number they hold."""
    import os
    import subprocess
    import time
    import uuid

    from kernel.topics import ensure_topics
    from tests.support.traffic import TrafficProducer

    tmp = tmp_path_factory.mktemp("notebook-warehouse")
    prefix = f"t{uuid.uuid4().hex[:12]}"
    ensure_topics(kafka_bootstrap, prefix, partitions=3)
    p = TrafficProducer(kafka_bootstrap, prefix, seed=31, turns=(6, 14))
    now = int(time.time() * 1000)
    for day in range(3):
        for _ in range(120):
            p.send(1, duplicates=0.05, now_ms=now - day * 86_400_000 - p.rng.randint(0, 36_000_000))
    p.flush()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLSTREAM_")}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=kafka_bootstrap,
        CALLSTREAM_TOPIC_PREFIX=prefix,
        CALLSTREAM_WAREHOUSE=str(tmp / "warehouse.duckdb"),
        CALLSTREAM_PARQUET_DIR=str(tmp / "parquet"),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "callstream", "sink", "--until-caught-up"],
        env=env,
        cwd=tmp,
        capture_output=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    # The same topics into an embedded lake, for the notebook that reads the lake.
    proc = subprocess.run(
        [sys.executable, "-m", "callstream", "sink", "--until-caught-up"],
        env={**env, **_lake_env(tmp / "parquet")},
        cwd=tmp,
        capture_output=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    numbers = {c[k] for c in p.sent.calls.values() for k in ("from_number", "to_number") if c.get(k)}
    return tmp / "parquet", numbers


def _lake_env(parquet: Path) -> dict[str, str]:
    lake = parquet.parent / "lake"
    return {"CALLSTREAM_LAKE_WAREHOUSE": str(lake), "CALLSTREAM_LAKE_CATALOG": f"sqlite:///{lake / 'catalog.db'}"}


def test_there_are_at_least_two_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"daily_operations.ipynb", "failed_calls.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_against_the_warehouse(
    path: Path, built_warehouse: tuple[Path, set[str]], monkeypatch, tmp_path: Path
):
    parquet, numbers = built_warehouse
    monkeypatch.setenv("CALLSTREAM_PARQUET_DIR", str(parquet))
    for k, v in _lake_env(parquet).items():
        monkeypatch.setenv(k, v)
    # Only the project's own kernel spec: "python" in it resolves to this interpreter (the venv), so
    # a kernel installed elsewhere on the machine (~/.local/share/jupyter) can never be picked up.
    monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert outputs[-1]["text"].strip() == sys.prefix
    # The charts were drawn.
    assert any("image/png" in o.get("data", {}) for o in outputs)
    # The warehouse keeps the numbers as sent (the default), and no report shows one.
    shown = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert numbers and not [n for n in numbers if n in shown or n[2:] in shown]
