"""The shared settings: what they accept, and how a bad value is put in words."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from kernel.errors import ConfigError
from kernel.settings import CommonSettings, LogSettings, config_problem, effective_log_level


@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("CALLSTREAM_"):
            monkeypatch.delenv(name)
    return tmp_path


@pytest.mark.parametrize(
    "value", ["127.0.0.1:9092", "a:1,b:2", "kafka-0.kafka:19092, kafka-1.kafka:19092", "[::1]:9092"]
)
def test_bootstrap_lists_of_host_and_port_are_accepted(value: str) -> None:
    assert CommonSettings(kafka_bootstrap=value).kafka_bootstrap == value


@pytest.mark.parametrize("value", ["localhost", "host:", ":9092", "host:port", "host:0", "host:70000", "a:1,b"])
def test_a_bootstrap_without_a_port_is_refused_by_name(value: str) -> None:
    with pytest.raises(ValidationError) as info:
        CommonSettings(kafka_bootstrap=value)
    line = config_problem(info.value)
    assert line.startswith("configuration: CALLSTREAM_KAFKA_BOOTSTRAP: ") and "host:port" in line
    assert "\n" not in line


def test_first_broker() -> None:
    assert CommonSettings(kafka_bootstrap="b1:9093,b2:9094").first_broker() == ("b1", 9093)


def test_the_log_level_is_case_insensitive_and_known() -> None:
    assert LogSettings(log_level="debug").log_level == "DEBUG"
    with pytest.raises(ValidationError, match="not one of"):
        LogSettings(log_level="LOUD")


def test_every_invalid_variable_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSTREAM_TOPIC_PARTITIONS", "0")
    monkeypatch.setenv("CALLSTREAM_LOG_LEVEL", "chatty")
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    line = config_problem(info.value)
    assert "CALLSTREAM_TOPIC_PARTITIONS: " in line and "CALLSTREAM_LOG_LEVEL: " in line
    assert line.endswith("(fix it in the environment or in .env)")


def test_a_dotenv_that_is_not_utf8_is_a_config_error(workdir: Path) -> None:
    (workdir / ".env").write_bytes(b"CALLSTREAM_TOPIC_PREFIX=caf\xe9\n")
    with pytest.raises(ConfigError, match=r"cannot read \.env"):
        CommonSettings()
    assert effective_log_level() == "INFO"  # the command that reads its settings says why


def test_the_log_level_comes_from_dotenv_unless_the_environment_says_otherwise(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (workdir / ".env").write_text("CALLSTREAM_LOG_LEVEL=debug\n")
    assert effective_log_level() == "DEBUG"
    monkeypatch.setenv("CALLSTREAM_LOG_LEVEL", "warning")
    assert effective_log_level() == "WARNING"


def test_topic_replication_is_unset_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kernel.topics import Replication

    assert CommonSettings().replication() == Replication(None, None)
    monkeypatch.setenv("CALLSTREAM_TOPIC_REPLICATION", "2")
    monkeypatch.setenv("CALLSTREAM_TOPIC_MIN_INSYNC_REPLICAS", "1")
    assert CommonSettings().replication() == Replication(2, 1)
    monkeypatch.setenv("CALLSTREAM_TOPIC_REPLICATION", "0")
    with pytest.raises(ValidationError) as info:
        CommonSettings()
    assert "CALLSTREAM_TOPIC_REPLICATION" in config_problem(info.value)
