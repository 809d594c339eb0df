"""Worker settings: `CALLSTREAM_*` variables (and `.env`), read once at start-up."""

from __future__ import annotations

from pydantic import SecretStr

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
