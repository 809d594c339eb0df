"""Every expected failure of every command: one line saying what is wrong and what to do, a non-zero
exit, and no traceback unless the log level is DEBUG. Each case runs the real `callstream` command
as a subprocess in a fresh working folder; none needs a broker (Kafka is a closed port)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest

from callstream.localkafka import free_port

BAD_UTF8_DOTENV = b"CALLSTREAM_TOPIC_PREFIX=caf\xe9\n"  # latin-1, not UTF-8
BAD_TOML = "[failure_rate\nthreshold = 0.3\n"
SMS_ROUTE = '[error]\nroute = "sms"\n'
PD_ROUTE = '[failure_rate]\nroute = ["pagerduty"]\n'


@dataclass
class Case:
    args: list[str]
    says: str  # the error line contains this
    env: dict[str, str] = field(default_factory=dict)
    dotenv: bytes | None = None
    files: dict[str, str] = field(default_factory=dict)
    no_java: bool = False  # PATH holds neither java nor mvn
    no_maven: bool = False  # PATH holds java but not mvn
    hold_port: bool = False  # "{held}" in args is a port something else listens on
    lock_duckdb: str | None = None  # this DuckDB file is open for writing in another process
    marks: tuple[pytest.MarkDecorator, ...] = ()


KEY = {"CALLSTREAM_API_KEYS": "k_test"}
BAD_BOOTSTRAP = {"CALLSTREAM_KAFKA_BOOTSTRAP": "localhost"}  # no port
SERVICES = {"gateway": ["gateway", "--port", "{free}"], "worker": ["worker", "--web-port", "{free}"], "sink": ["sink"]}

CASES: dict[str, Case] = {
    # Kafka unreachable
    "sink --until-caught-up, Kafka down": Case(["sink", "--until-caught-up"], "Kafka"),
    # missing API key
    "gateway without a key": Case(["gateway", "--port", "{free}"], "CALLSTREAM_API_KEYS"),
    # invalid configuration, named by its variable
    "worker, CALLSTREAM_WEB_PORT not a number": Case(
        ["worker"], "CALLSTREAM_WEB_PORT", env={"CALLSTREAM_WEB_PORT": "abc"}
    ),
    "worker, CALLSTREAM_WEB_PORT not a number in .env": Case(
        ["worker"], "CALLSTREAM_WEB_PORT", dotenv=b"CALLSTREAM_WEB_PORT=abc\n"
    ),
    "gateway, CALLSTREAM_MAX_BODY_BYTES not a number": Case(
        ["gateway", "--port", "{free}"], "CALLSTREAM_MAX_BODY_BYTES", env={**KEY, "CALLSTREAM_MAX_BODY_BYTES": "lots"}
    ),
    "sink, CALLSTREAM_BATCH_MAX_RECORDS not a number": Case(
        ["sink"], "CALLSTREAM_BATCH_MAX_RECORDS", env={"CALLSTREAM_BATCH_MAX_RECORDS": "many"}
    ),
    "kafka status, CALLSTREAM_LOG_LEVEL unknown": Case(
        ["kafka", "status"], "CALLSTREAM_LOG_LEVEL", env={"CALLSTREAM_LOG_LEVEL": "LOUD"}
    ),
    **{
        f"{' '.join(args[:2])}, CALLSTREAM_KAFKA_BOOTSTRAP without a port": Case(
            args, "CALLSTREAM_KAFKA_BOOTSTRAP", env={**KEY, **BAD_BOOTSTRAP}
        )
        for args in (["kafka", "start"], ["kafka", "status"], ["up"], *SERVICES.values())
    },
    # a .env that cannot be read
    **{
        f"{' '.join(args[:2])}, .env not UTF-8": Case(args, ".env", env=KEY, dotenv=BAD_UTF8_DOTENV)
        for args in (["kafka", "start"], ["up"], ["simulate", "--calls", "1"], *SERVICES.values())
    },
    # warehouse errors
    "sink, warehouse folder is a file": Case(
        ["sink"], "afile", env={"CALLSTREAM_WAREHOUSE": "afile/warehouse.duckdb"}, files={"afile": ""}
    ),
    "sink, warehouse file in use by another process": Case(
        ["sink"],
        "w.duckdb",
        env={"CALLSTREAM_WAREHOUSE": "w.duckdb"},
        lock_duckdb="w.duckdb",
    ),
    "warehouse forget, warehouse file in use by the sink": Case(
        ["warehouse", "forget", "--call-id", "c1"],
        "stop the sink first",
        env={"CALLSTREAM_WAREHOUSE": "w.duckdb"},
        lock_duckdb="w.duckdb",
    ),
    "warehouse forget, no warehouse": Case(["warehouse", "forget", "--call-id", "c1"], "there is no warehouse"),
    # personal-data settings
    "sink, phone numbers hashed without a key": Case(
        ["sink"], "CALLSTREAM_PHONE_HASH_KEY", env={"CALLSTREAM_STORE_PHONE_NUMBERS": "hash"}
    ),
    "sink into the lake, phone numbers hashed without a key": Case(
        ["sink"],
        "CALLSTREAM_PHONE_HASH_KEY",
        env={
            "CALLSTREAM_STORE_PHONE_NUMBERS": "hash",
            "CALLSTREAM_LAKE_WAREHOUSE": "lake",
            "CALLSTREAM_LAKE_CATALOG": "sqlite:///lake/catalog.db",
        },
    ),
    "sink, phone hash key too short": Case(
        ["sink"],
        "CALLSTREAM_PHONE_HASH_KEY",
        env={"CALLSTREAM_STORE_PHONE_NUMBERS": "hash", "CALLSTREAM_PHONE_HASH_KEY": "k"},
    ),
    "sink, CALLSTREAM_STORE_TRANSCRIPTS unknown": Case(
        ["sink"], "CALLSTREAM_STORE_TRANSCRIPTS", env={"CALLSTREAM_STORE_TRANSCRIPTS": "redact"}
    ),
    # replay and backfill
    "replay dead-letter, Kafka down": Case(["replay", "dead-letter"], "Kafka"),
    "backfill, no such file": Case(["backfill", "nowhere.json"], "does not exist"),
    # port in use
    "gateway, port in use": Case(["gateway", "--port", "{held}"], "--port", env=KEY, hold_port=True),
    "worker, port in use": Case(["worker", "--web-port", "{held}"], "--web-port", hold_port=True),
    "up, gateway port in use": Case(["up", "--gateway-port", "{held}"], "--gateway-port", hold_port=True),
    "up, dashboard port in use": Case(["up", "--web-port", "{held}"], "--web-port", hold_port=True),
    "kafka start, port in use": Case(["kafka", "start", "--port", "{held}"], "--port", hold_port=True),
    # Java or Maven missing
    "warehouse compact without a Parquet folder": Case(["warehouse", "compact"], "CALLSTREAM_PARQUET_DIR"),
    "kafka start without java": Case(["kafka", "start"], "java", no_java=True),
    "kafka start without maven": Case(["kafka", "start"], "mvn", no_maven=True),
    "up without java": Case(["up"], "java", no_java=True),
    # a bad alerts file
    "worker, alerts file not TOML": Case(
        ["worker"], "not valid TOML", env={"CALLSTREAM_ALERTS_CONFIG": "alerts.toml"}, files={"alerts.toml": BAD_TOML}
    ),
    "worker, alerts file missing": Case(["worker"], "does not exist", env={"CALLSTREAM_ALERTS_CONFIG": "nowhere.toml"}),
    "up, alerts file not TOML": Case(
        ["up"], "not valid TOML", env={"CALLSTREAM_ALERTS_CONFIG": "alerts.toml"}, files={"alerts.toml": BAD_TOML}
    ),
    # alert routes
    **{
        f"{args[0]}, alert route unknown": Case(
            args, "route 'sms' is unknown", env={"CALLSTREAM_ALERTS_CONFIG": "a.toml"}, files={"a.toml": SMS_ROUTE}
        )
        for args in (["worker"], ["up"])
    },
    **{
        f"{args[0]}, pagerduty route without its routing key": Case(
            args,
            "CALLSTREAM_PAGERDUTY_ROUTING_KEY",
            env={"CALLSTREAM_ALERTS_CONFIG": "a.toml"},
            files={"a.toml": PD_ROUTE},
        )
        for args in (["worker"], ["up"])
    },
    # the read side open to everyone by mistake
    **{
        f"{args[0]} on 0.0.0.0 without dashboard tokens (.env)": Case(
            args, "CALLSTREAM_DASHBOARD_TOKENS", dotenv=b"CALLSTREAM_WEB_HOST=0.0.0.0\n"
        )
        for args in (["worker"], ["up"])
    },
}


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on which something that is not ours listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _path_without(tmp_path: Path, java: bool) -> str:
    """A PATH with nothing but (optionally) java on it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    found = shutil.which("java")
    if java and found:
        (bin_dir / "java").symlink_to(found)
    return str(bin_dir)


def run_cli(case: Case, folder: Path, port: int) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLSTREAM_", "RETELL_", "KAFKA_"))}
    env.update(
        CALLSTREAM_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",  # nothing listens there
        CALLSTREAM_KAFKA_HOME=str(folder / "kafka"),
        CALLSTREAM_KAFKA_CACHE=str(folder / "empty-jar-cache"),
        PYTHONUNBUFFERED="1",
    )
    env.update(case.env)
    if case.no_java or case.no_maven:
        env["PATH"] = _path_without(folder, java=case.no_maven)
    if case.dotenv is not None:
        (folder / ".env").write_bytes(case.dotenv)
    for name, text in case.files.items():
        (folder / name).write_text(text)
    args = [a.replace("{held}", str(port)).replace("{free}", str(free_port())) for a in case.args]
    with contextlib.ExitStack() as held:
        if case.lock_duckdb:
            held.enter_context(duckdb.connect(str(folder / case.lock_duckdb)))
        return subprocess.run(
            [sys.executable, "-m", "callstream", *args],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )


def assert_one_line_error(r: subprocess.CompletedProcess[str], says: str) -> str:
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines, out[-3000:]
    last = lines[-1]
    assert says in last, f"the error line {last!r} does not say {says!r}:\n{out[-3000:]}"
    errors = [line for line in lines if line.startswith("Error:")]
    assert errors == [last], f"not one error line: {errors}"
    return last


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks, id=n) for n, c in CASES.items()])
def test_expected_failure_is_one_line_and_a_non_zero_exit(name: str, tmp_path: Path, held_port: int) -> None:
    case = CASES[name]
    r = run_cli(case, tmp_path, held_port)
    assert_one_line_error(r, case.says)


@pytest.mark.parametrize(
    "how",
    [
        {"env": {"CALLSTREAM_LOG_LEVEL": "DEBUG"}},
        {"env": {"CALLSTREAM_LOG_LEVEL": "debug"}},
        {"dotenv": b"CALLSTREAM_LOG_LEVEL=DEBUG\n"},
        {"flag": True},
    ],
    ids=["environment", "lower case", ".env", "--log-level"],
)
def test_debug_log_level_shows_the_traceback(how: dict, tmp_path: Path) -> None:
    args = ["--log-level", "DEBUG", "worker"] if how.get("flag") else ["worker"]
    case = Case(args, "CALLSTREAM_WEB_PORT", env={"CALLSTREAM_WEB_PORT": "abc", **how.get("env", {})})
    case.dotenv = how.get("dotenv")
    r = run_cli(case, tmp_path, 0)
    assert r.returncode != 0
    assert "Traceback" in r.stderr, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1].startswith("Error:") and "CALLSTREAM_WEB_PORT" in r.stderr.splitlines()[-1]


def test_environment_beats_dotenv_for_the_log_level(tmp_path: Path) -> None:
    case = Case(["worker"], "CALLSTREAM_WEB_PORT", env={"CALLSTREAM_WEB_PORT": "abc", "CALLSTREAM_LOG_LEVEL": "INFO"})
    case.dotenv = b"CALLSTREAM_LOG_LEVEL=DEBUG\n"
    assert_one_line_error(run_cli(case, tmp_path, 0), "CALLSTREAM_WEB_PORT")


def test_help_works_with_a_broken_dotenv(tmp_path: Path) -> None:
    for args in (["--help"], ["sink", "--help"], ["kafka", "start", "--help"]):
        case = Case(args, "", dotenv=BAD_UTF8_DOTENV)
        r = run_cli(case, tmp_path, 0)
        assert r.returncode == 0, r.stderr
        assert "Usage:" in r.stdout


def test_only_the_first_line_of_a_message_is_the_error_line() -> None:
    from callstream.cli import _one_line
    from kernel.errors import CallstreamError

    exc = CallstreamError("gateway exited with code 1; see data/logs/gateway.log:\nits last lines\nmore")
    assert _one_line(exc).message == "gateway exited with code 1; see data/logs/gateway.log:"
