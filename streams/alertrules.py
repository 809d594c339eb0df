"""Alert rules and their configuration: which rules are on and their thresholds, from a TOML file.

The defaults ship in the package (`streams/alerts.default.toml`); `CALLSTREAM_ALERTS_CONFIG` names
a file whose tables override them key by key.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from streams.errors import AlertConfigError

# Bit of each per-call rule in CallState.alerts: a rule fires once per call.
CALL_RULES: tuple[str, ...] = ("failed_dial", "error", "unsuccessful", "negative_sentiment", "transfer_cancelled")
RATE_RULE = "failure_rate"
RULE_BIT: dict[str, int] = {name: 1 << i for i, name in enumerate(CALL_RULES)}


# Where a rule's alerts are delivered besides the alerts topic (the settings name each one's endpoint).
ROUTES: tuple[str, ...] = ("slack", "pagerduty", "json")
SEVERITIES: tuple[str, ...] = ("critical", "error", "warning", "info")


class Rule(msgspec.Struct, forbid_unknown_fields=True):
    """What every rule has: on or off, its route(s) and the severity its alerts carry."""

    enabled: bool = True
    # A route name, a list of them, or [] (the topic only); unset: "slack" when its URL is set.
    route: str | list[str] | None = None
    severity: str = "warning"

    def routes(self) -> list[str] | None:
        """The routes the file names, or None for the default."""
        return [self.route] if isinstance(self.route, str) else self.route


class FailedDialRule(Rule, forbid_unknown_fields=True):
    reasons: list[str] = msgspec.field(default_factory=list)
    reason_prefixes: list[str] = msgspec.field(default_factory=list)


class ErrorRule(Rule, forbid_unknown_fields=True):
    reason_prefixes: list[str] = msgspec.field(default_factory=lambda: ["error_"])


class UnsuccessfulRule(Rule, forbid_unknown_fields=True):
    # Voicemail is an expected outcome of outbound campaigns, not a failure of the agent.
    ignore_voicemail: bool = True


class SentimentRule(Rule, forbid_unknown_fields=True):
    sentiments: list[str] = msgspec.field(default_factory=lambda: ["Negative"])


class TransferCancelledRule(Rule, forbid_unknown_fields=True):
    pass


class FailureRateRule(Rule, forbid_unknown_fields=True):
    window_minutes: int = 5
    threshold: float = 0.5
    min_calls: int = 5
    throttle_minutes: int = 15
    check_seconds: float = 5.0


class AlertConfig(msgspec.Struct, forbid_unknown_fields=True):
    failed_dial: FailedDialRule = msgspec.field(default_factory=FailedDialRule)
    error: ErrorRule = msgspec.field(default_factory=ErrorRule)
    unsuccessful: UnsuccessfulRule = msgspec.field(default_factory=UnsuccessfulRule)
    negative_sentiment: SentimentRule = msgspec.field(default_factory=SentimentRule)
    transfer_cancelled: TransferCancelledRule = msgspec.field(default_factory=TransferCancelledRule)
    failure_rate: FailureRateRule = msgspec.field(default_factory=FailureRateRule)

    def is_failed_dial(self, reason: str) -> bool:
        fd = self.failed_dial
        return reason in fd.reasons or reason.startswith(tuple(fd.reason_prefixes))

    def is_error(self, reason: str) -> bool:
        return reason.startswith(tuple(self.error.reason_prefixes))

    def enabled(self, rule: str) -> bool:
        return bool(getattr(self, rule).enabled)

    def rule(self, name: str) -> Rule:
        rule: Rule = getattr(self, name)
        return rule


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def default_toml() -> str:
    return resources.files("streams").joinpath("alerts.default.toml").read_text(encoding="utf-8")


def load_config(path: str | Path | None = None) -> AlertConfig:
    """The shipped defaults, overridden by the TOML file at `path` when given."""
    data = tomllib.loads(default_toml())
    if path is not None:
        p = Path(path)
        try:
            data = _merge(data, tomllib.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError as exc:
            raise AlertConfigError(f"alert config {p} does not exist (CALLSTREAM_ALERTS_CONFIG)") from exc
        except tomllib.TOMLDecodeError as exc:
            raise AlertConfigError(f"alert config {p} is not valid TOML: {exc}") from exc
    try:
        config = msgspec.convert(data, AlertConfig)
    except msgspec.ValidationError as exc:
        raise AlertConfigError(f"alert config {path or 'defaults'}: {exc}") from exc
    _check_routes(config, path)
    return config


def _check_routes(config: AlertConfig, path: str | Path | None) -> None:
    for name in (*CALL_RULES, RATE_RULE):
        rule = config.rule(name)
        unknown = [r for r in rule.routes() or [] if r not in ROUTES]
        if unknown:
            raise AlertConfigError(
                f"alert config {path or 'defaults'}: [{name}] route {unknown[0]!r} is unknown "
                f"(the routes are {', '.join(ROUTES)})"
            )
        if rule.severity not in SEVERITIES:
            raise AlertConfigError(
                f"alert config {path or 'defaults'}: [{name}] severity {rule.severity!r} is not one of "
                f"{', '.join(SEVERITIES)}"
            )
