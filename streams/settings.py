"""Worker settings: `CALLSTREAM_*` variables (and `.env`), read once at start-up."""

from __future__ import annotations

from pydantic import Field, SecretStr

from kernel.settings import CommonSettings

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"


class WorkerSettings(CommonSettings):
    app_id: str = "callstream-metrics"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # How the other workers reach this one's web server (they merge each other's partitions);
    # set it when web_host is 0.0.0.0, e.g. http://worker-1:6066.
    web_url: str | None = None
    # The read side: with tokens, the dashboard, /api/* and /metrics want one (comma-separated, several
    # during a rotation); without, the web server binds to loopback only unless dashboard_public says so.
    dashboard_tokens: SecretStr | None = None
    dashboard_public: bool = False
    data_dir: str = "data/faust"
    # Alert routes (which rule takes which: the alerts TOML's `route`): the Slack-compatible webhook,
    # a generic JSON webhook, and PagerDuty's Events API v2.
    alert_webhook_url: SecretStr | None = None
    alert_json_url: SecretStr | None = None
    pagerduty_routing_key: SecretStr | None = None
    pagerduty_url: str = PAGERDUTY_EVENTS_URL
    # A TOML file overriding the shipped alert rules (streams/alerts.default.toml).
    alerts_config: str | None = None
    # The most events one fetch hands the processor as a batch (one commit record per partition).
    batch_size: int = 2000
    # How soon the group notices a dead worker and hands its partitions to the others.
    session_timeout_s: float = 10.0
    # How long a call's state is kept after its last delivery, in event time (`received_at`):
    # once its analysis was counted, and for a call that never gets one (see streams/lifetime.py).
    call_ttl_analyzed_s: float = Field(default=6 * 3600.0, gt=0)
    call_ttl_idle_s: float = Field(default=24 * 3600.0, gt=0)

    def dashboard_token_list(self) -> list[str]:
        """The read-side tokens; the first is the one this worker shows its peers."""
        raw = self.dashboard_tokens.get_secret_value() if self.dashboard_tokens else ""
        return [t.strip() for t in raw.split(",") if t.strip()]
