"""Every callstream variable is honoured from `.env` in the working folder and from the environment,
and the environment wins. The variables are every field of every settings class (so a new setting is
covered the day it is added), and the README documents none that callstream does not read."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from callstream.config import SETTINGS, known_variables, unknown_variables
from callstream.localkafka import LocalKafka, free_port
from callstream.up import Stack
from kernel.settings import variable
from tests.support.paths import REPO

# Values that a plain "some string" would not pass (each pair: in .env, in the environment).
SPECIAL = {
    "CALLSTREAM_KAFKA_BOOTSTRAP": ("broker-a:9093,broker-b:9093", "broker-c:9094"),
    "CALLSTREAM_LOG_LEVEL": ("DEBUG", "WARNING"),
    # `hash` needs the key as well: it has its own tests (tests/warehouse/test_personal_data.py).
    "CALLSTREAM_STORE_PHONE_NUMBERS": ("mask", "keep"),
    "CALLSTREAM_STORE_TRANSCRIPTS": ("drop", "keep"),
    "CALLSTREAM_STORE_RECORDING_URLS": ("drop", "keep"),
}


def _fields() -> dict[str, tuple[type[BaseSettings], str, FieldInfo]]:
    out: dict[str, tuple[type[BaseSettings], str, FieldInfo]] = {}
    for cls in SETTINGS:
        for name, info in cls.model_fields.items():
            alias = info.validation_alias
            out.setdefault(alias if isinstance(alias, str) else variable(name), (cls, name, info))
    return out


FIELDS = _fields()


def _values(var: str, info: FieldInfo) -> tuple[str, str]:
    """A value for `.env` and another for the environment, both unlike the default."""
    if var in SPECIAL:
        return SPECIAL[var]
    kinds = str(info.annotation)
    if "bool" in kinds:
        return ("false", "true") if info.default else ("true", "false")
    if "int" in kinds:
        return "7", "9"
    if "float" in kinds:
        return "2.5", "3.5"
    return f"{var.lower()}-from-dotenv", f"{var.lower()}-from-env"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder and an environment without any callstream variable."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("CALLSTREAM_", "RETELL_")):
            monkeypatch.delenv(name)
    return tmp_path


def _read(var: str, dotenv: str, workdir: Path) -> Any:
    cls, name, _ = FIELDS[var]
    lines = [f"{var}={dotenv}"]
    if var not in ("CALLSTREAM_API_KEYS", "RETELL_API_KEY"):
        lines.append("CALLSTREAM_API_KEYS=k-base")  # the gateway's settings refuse to exist without a key
    (workdir / ".env").write_text("\n".join(lines) + "\n")
    return getattr(cls(), name)


@pytest.mark.parametrize("var", sorted(FIELDS))
def test_variable_is_read_from_dotenv(var: str, workdir: Path) -> None:
    _, _, info = FIELDS[var]
    in_dotenv, _ = _values(var, info)
    want = TypeAdapter(info.annotation).validate_python(in_dotenv)
    got = _read(var, in_dotenv, workdir)
    assert got == want and got != info.default


@pytest.mark.parametrize("var", sorted(FIELDS))
def test_environment_beats_dotenv(var: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, info = FIELDS[var]
    in_dotenv, in_env = _values(var, info)
    monkeypatch.setenv(var, in_env)
    assert _read(var, in_dotenv, workdir) == TypeAdapter(info.annotation).validate_python(in_env)


def test_readme_documents_only_variables_callstream_reads() -> None:
    documented = set(re.findall(r"\b(?:CALLSTREAM|RETELL)_[A-Z0-9_]*[A-Z0-9]\b", (REPO / "README.md").read_text()))
    assert documented, "the README names no variable?"
    assert documented - known_variables() == set(), "the README documents variables no setting reads"
    assert documented <= set(FIELDS)


def test_unknown_variables_are_named_with_where_they_are(workdir: Path) -> None:
    (workdir / ".env").write_text("CALLSTREAM_API_KEY=typo\nCALLSTREAM_TOPIC_PREFIX=p\nOTHER_APP=1\n")
    env = {"CALLSTREAM_WEB_PROT": "1", "CALLSTREAM_WEB_PORT": "1", "PATH": "/bin"}
    assert unknown_variables(env, workdir / ".env") == {
        "CALLSTREAM_API_KEY": str(workdir / ".env"),
        "CALLSTREAM_WEB_PROT": "the environment",
    }


# -- behaviour beyond the settings objects ------------------------------------------------------


def test_local_kafka_takes_bootstrap_home_cache_and_version_from_dotenv(workdir: Path) -> None:
    (workdir / ".env").write_text(
        "CALLSTREAM_KAFKA_BOOTSTRAP=127.0.0.2:19093\nCALLSTREAM_KAFKA_HOME=kh\n"
        "CALLSTREAM_KAFKA_CACHE=jar-cache\nCALLSTREAM_KAFKA_VERSION=4.0.9\n"
    )
    k = LocalKafka.configured()
    assert (k.host, k.port, k.home, k.jars, k.version) == (
        "127.0.0.2",
        19093,
        workdir / "kh",
        workdir / "jar-cache" / "4.0.9",
        "4.0.9",
    )
    assert LocalKafka.configured(port=19999, home=workdir / "other").state == workdir / "other" / "broker-19999"


@pytest.mark.parametrize("var", ["CALLSTREAM_API_KEYS", "RETELL_API_KEY"])
def test_up_signs_with_the_key_from_dotenv_instead_of_making_one(var: str, workdir: Path) -> None:
    (workdir / ".env").write_text(f"{var}=k-dotenv,k-old\n")
    said: list[str] = []
    stack = Stack(gateway_port=free_port(), web_port=free_port(), say=said.append)
    env, key = stack._preflight()
    assert key == "k-dotenv"
    assert "CALLSTREAM_API_KEYS" not in env  # the services read the same .env
    assert not any("made a local key" in line for line in said)


def test_up_makes_a_key_when_none_is_configured(workdir: Path) -> None:
    said: list[str] = []
    env, key = Stack(gateway_port=free_port(), web_port=free_port(), say=said.append)._preflight()
    assert key.startswith("local-") and env["CALLSTREAM_API_KEYS"] == key
    assert any("made a local key" in line for line in said)
