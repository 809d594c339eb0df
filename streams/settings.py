"""Worker settings: `CALLSTREAM_*` variables (and `.env`), read once at start-up."""

from __future__ import annotations

from pydantic import Field, SecretStr

from kernel.settings import CommonSettings


class WorkerSettings(CommonSettings):
    app_id: str = "callstream-metrics"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # How the other workers reach this one's web server (they merge each other's partitions);
    # set it when web_host is 0.0.0.0, e.g. http://worker-1:6066.
    web_url: str | None = None
    data_dir: str = "data/faust"
    alert_webhook_url: SecretStr | None = None
    # A TOML file overriding the shipped alert rules (streams/alerts.default.toml).
    alerts_config: str | None = None
    # Events per batch and the longest wait to fill one: batching is what makes Faust fast.
    batch_size: int = 2000
    batch_within_s: float = 0.05
    # How soon the group notices a dead worker and hands its partitions to the others.
    session_timeout_s: float = 10.0
    # How long a call's state is kept after its last delivery, in event time (`received_at`):
    # once its analysis was counted, and for a call that never gets one (see streams/lifetime.py).
    call_ttl_analyzed_s: float = Field(default=6 * 3600.0, gt=0)
    call_ttl_idle_s: float = Field(default=24 * 3600.0, gt=0)
