"""Settings shared by every callstream process, read once at start-up from the environment and `.env`.

The environment wins over `.env` (in the working folder), which wins over the defaults. Every
`CALLSTREAM_*` variable is a field of one of the settings classes built on `CommonSettings`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kernel.errors import ConfigError
from kernel.topics import Replication

ENV_PREFIX = "CALLSTREAM_"
DOTENV = ".env"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class LogSettings(BaseSettings):
    """The log level, and how every callstream settings class reads the environment and `.env`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=DOTENV, env_file_encoding="utf-8", extra="ignore")

    log_level: str = "INFO"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except (OSError, UnicodeDecodeError) as exc:
            # Raised while reading `.env`: a broken file must not look like a bug in callstream.
            raise ConfigError(f"cannot read {DOTENV} in the working folder ({exc}); fix or remove it") from exc

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
        return value.upper()


class CommonSettings(LogSettings):
    """`CALLSTREAM_*` variables that the gateway, worker and sink all read."""

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "retell"
    # Partitions for topics callstream creates itself; several let several workers share the load.
    topic_partitions: int = Field(default=3, ge=1)
    # Replicas of those topics and how many must hold a write; unset: 3 and 2 on a cluster of three
    # or more brokers, else 1 (kernel.topics.Replication).
    topic_replication: int | None = Field(default=None, ge=1)
    topic_min_insync_replicas: int | None = Field(default=None, ge=1)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _host_port_list(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{server.strip()!r} is not host:port (a comma-separated list of them)")
        return value

    def replication(self) -> Replication:
        """The replication of the topics callstream creates, as configured."""
        return Replication(self.topic_replication, self.topic_min_insync_replicas)

    def first_broker(self) -> tuple[str, int]:
        """Host and port of the first bootstrap server."""
        host, _, port = self.kafka_bootstrap.split(",")[0].strip().rpartition(":")
        return host, int(port)


def variable(field: str) -> str:
    """The environment variable of a settings field (aliases such as RETELL_API_KEY are upper case)."""
    return field if field.isupper() else f"{ENV_PREFIX}{field.upper()}"


def config_problem(exc: ValidationError) -> str:
    """One line naming each invalid variable and why, for the CLI's error message."""
    parts = []
    for err in exc.errors():
        reason = err.get("ctx", {}).get("error") or err["msg"]
        loc = [str(p) for p in err["loc"]]
        parts.append(f"{variable(loc[0])}: {reason}" if loc else str(reason))
    return f"configuration: {'; '.join(parts)} (fix it in the environment or in {DOTENV})"


def effective_log_level() -> str:
    """CALLSTREAM_LOG_LEVEL (environment, then `.env`), else INFO.

    When it cannot be read this says INFO: the command that reads its settings then says why.
    """
    try:
        return LogSettings().log_level
    except (ConfigError, ValidationError):
        return "INFO"
