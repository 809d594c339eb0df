"""Settings shared by every callstream process, read once at start-up from the environment and `.env`."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """`CALLSTREAM_*` variables that the gateway, worker and sink all read."""

    model_config = SettingsConfigDict(
        env_prefix="CALLSTREAM_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    kafka_bootstrap: str = "127.0.0.1:9092"
    topic_prefix: str = "retell"
    # Partitions for topics callstream creates itself; several let several workers share the load.
    topic_partitions: int = 3
    log_level: str = "INFO"
