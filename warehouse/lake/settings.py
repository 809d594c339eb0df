"""Lake settings: `CALLSTREAM_LAKE_*` (and the sink's batch limits), plus the usual `AWS_*` for S3.

The lake is off unless both `CALLSTREAM_LAKE_WAREHOUSE` and `CALLSTREAM_LAKE_CATALOG` are set.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from warehouse.personal_data import PersonalDataSettings


class S3Settings(BaseSettings):
    """The S3 endpoint and credentials, under the names every AWS tool reads."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    endpoint_url: str | None = Field(default=None, validation_alias="AWS_ENDPOINT_URL")
    access_key_id: str | None = Field(default=None, validation_alias="AWS_ACCESS_KEY_ID")
    secret_access_key: SecretStr | None = Field(default=None, validation_alias="AWS_SECRET_ACCESS_KEY")
    region: str = Field(default="us-east-1", validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))


class LakeSettings(PersonalDataSettings):
    lake_warehouse: str | None = None
    # A SQLAlchemy URL; it may hold a password, so it is never logged as it is.
    lake_catalog: SecretStr | None = None
    lake_namespace: str = "callstream"
    lake_catalog_name: str = "callstream"
    # The consumer group the lake sinks share (several sinks split the partitions).
    lake_group_id: str = "callstream-lake"
    # A stable name per sink (Kafka static membership): a sink restarted under the same name takes its
    # partitions back at once, instead of after the session timeout and a rebalance.
    lake_instance_id: str | None = None
    # A batch is committed when it has this many records or bytes, or is this old: the age bounds the
    # freshness of the lake, the size the number of files per commit.
    lake_batch_max_records: int = 2000
    lake_batch_max_bytes: int = 64 * 1024 * 1024
    lake_batch_max_seconds: float = 2.0
    # Attempts of one commit that lost to a concurrent one before the sink gives up.
    lake_commit_attempts: int = 50
    # Keys of data files kept in memory to find the rows a redelivery replaces (rows of all tables).
    lake_key_cache_rows: int = 20_000_000

    @property
    def enabled(self) -> bool:
        return bool(self.lake_warehouse) and self.lake_catalog is not None

    def warehouse_uri(self) -> str:
        """The warehouse as pyiceberg wants it: an S3 URL as it is, a local folder as file:// URL."""
        assert self.lake_warehouse
        if "://" in self.lake_warehouse:
            return self.lake_warehouse.rstrip("/")
        path = Path(self.lake_warehouse).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()

    def catalog_url(self) -> str:
        assert self.lake_catalog is not None
        url = self.lake_catalog.get_secret_value()
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return url

    def describe(self) -> str:
        """The catalog and warehouse for a log line, without the catalog's password."""
        from sqlalchemy.engine import make_url

        url = make_url(self.catalog_url()).render_as_string(hide_password=True)
        return f"catalog {url}, warehouse {self.lake_warehouse}"


def storage_properties(warehouse: str, s3: S3Settings | None = None) -> dict[str, str]:
    """pyiceberg FileIO properties for the warehouse (S3 from the `AWS_*` variables)."""
    if not warehouse.startswith(("s3://", "s3a://")):
        return {}
    s3 = s3 or S3Settings()
    # The AWS SDK's default CRC checksums on uploads are refused by some S3-compatible servers
    # (S3Proxy answers XAmzContentSHA256Mismatch); AWS accepts uploads without them too.
    os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    props = {"s3.region": s3.region, "py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"}
    if s3.endpoint_url:
        props["s3.endpoint"] = s3.endpoint_url
    if s3.access_key_id:
        props["s3.access-key-id"] = s3.access_key_id
    if s3.secret_access_key is not None:
        props["s3.secret-access-key"] = s3.secret_access_key.get_secret_value()
    return props
