"""Alert routes: where each rule's alerts are POSTed besides the alerts topic, and in which shape.

- `slack`: Slack-compatible JSON, `{"text": ..., "alert": {...}}`, to CALLSTREAM_ALERT_WEBHOOK_URL.
- `pagerduty`: PagerDuty's Events API v2 (`trigger`, `dedup_key` = the alert id, so a retried or
  repeated alert stays one incident), with CALLSTREAM_PAGERDUTY_ROUTING_KEY, to CALLSTREAM_PAGERDUTY_URL.
- `json`: the alert itself with its severity, to CALLSTREAM_ALERT_JSON_URL.

A rule picks them with `route` in the alerts TOML; `routing` checks at start that each route an
enabled rule names has its URL or key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from pydantic import SecretStr

from streams.alertrules import CALL_RULES, RATE_RULE, AlertConfig
from streams.errors import AlertConfigError
from streams.processor import Alert
from streams.settings import WorkerSettings

Body = Callable[[Alert, str], dict[str, Any]]
SOURCE = "callstream"


def slack_body(alert: Alert, severity: str) -> dict[str, Any]:
    return {"text": alert.text, "alert": msgspec.to_builtins(alert)}


def json_body(alert: Alert, severity: str) -> dict[str, Any]:
    return {**msgspec.to_builtins(alert), "severity": severity, "source": SOURCE}


def pagerduty_body(routing_key: str) -> Body:
    def body(alert: Alert, severity: str) -> dict[str, Any]:
        return {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": alert.id[:255],
            "payload": {
                "summary": alert.text[:1024],
                "source": alert.agent_id or SOURCE,
                "severity": severity,
                "timestamp": datetime.fromtimestamp(alert.at / 1000, UTC).isoformat(),
                "component": SOURCE,
                "class": alert.rule,
                "custom_details": msgspec.to_builtins(alert),
            },
            "client": SOURCE,
        }

    return body


@dataclass(frozen=True)
class Route:
    name: str
    url: str  # may hold a secret (Slack's URLs do): never logged
    body: Body


class Routing:
    """The routes of each rule and the severity its alerts carry."""

    def __init__(self, by_rule: dict[str, tuple[Route, ...]], severity: dict[str, str]) -> None:
        self.by_rule = by_rule
        self.severity = severity

    @classmethod
    def none(cls) -> Routing:
        return cls({}, {})

    def routes(self, alert: Alert) -> tuple[Route, ...]:
        return self.by_rule.get(alert.rule, ())

    def body(self, route: Route, alert: Alert) -> dict[str, Any]:
        return route.body(alert, self.severity.get(alert.rule, "warning"))

    @property
    def active(self) -> bool:
        return any(self.by_rule.values())


# Each route's setting, by the variable a user sets.
_NEEDS = {
    "slack": "CALLSTREAM_ALERT_WEBHOOK_URL",
    "json": "CALLSTREAM_ALERT_JSON_URL",
    "pagerduty": "CALLSTREAM_PAGERDUTY_ROUTING_KEY",
}


def _url(value: SecretStr | str | None, variable: str) -> str | None:
    url = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise AlertConfigError(f"{variable} is not an http:// or https:// URL")
    return url


def _available(settings: WorkerSettings) -> dict[str, Route]:
    out: dict[str, Route] = {}
    slack = _url(settings.alert_webhook_url, "CALLSTREAM_ALERT_WEBHOOK_URL")
    if slack:
        out["slack"] = Route("slack", slack, slack_body)
    generic = _url(settings.alert_json_url, "CALLSTREAM_ALERT_JSON_URL")
    if generic:
        out["json"] = Route("json", generic, json_body)
    key = settings.pagerduty_routing_key.get_secret_value() if settings.pagerduty_routing_key else ""
    if key:
        url = _url(settings.pagerduty_url, "CALLSTREAM_PAGERDUTY_URL") or ""
        out["pagerduty"] = Route("pagerduty", url, pagerduty_body(key))
    return out


def routing(rules: AlertConfig, settings: WorkerSettings) -> Routing:
    """Each enabled rule's routes; an error naming the missing setting when a route lacks its URL or key."""
    available = _available(settings)
    by_rule: dict[str, tuple[Route, ...]] = {}
    severity: dict[str, str] = {}
    for name in (*CALL_RULES, RATE_RULE):
        rule = rules.rule(name)
        severity[name] = rule.severity
        if not rule.enabled:
            continue
        wanted = rule.routes()
        if wanted is None:
            wanted = ["slack"] if "slack" in available else []
        missing = [r for r in wanted if r not in available]
        if missing:
            raise AlertConfigError(
                f"alert rule [{name}] routes to {missing[0]}, but {_NEEDS[missing[0]]} is not set "
                "(set it, or change the rule's route in CALLSTREAM_ALERTS_CONFIG)"
            )
        by_rule[name] = tuple(available[r] for r in dict.fromkeys(wanted))
    return Routing(by_rule, severity)
