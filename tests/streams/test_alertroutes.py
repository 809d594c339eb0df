"""Alert routes: each rule's alerts POSTed to its routes (Slack-compatible, PagerDuty Events API v2,
generic JSON), each in its own body format, against real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from streams.alertroutes import routing
from streams.alertrules import load_config
from streams.alerts import WebhookSender
from streams.errors import AlertConfigError
from streams.processor import Alert
from streams.settings import WorkerSettings
from tests.support.receiver import Receiver

AT = 1_790_000_040_000
KEY = "R0UTINGKEY0123456789abcdef012345"

ROUTED = """
[error]
route = "pagerduty"
[failed_dial]
route = ["slack", "json"]
[failure_rate]
route = "json"
[negative_sentiment]
route = []
"""


def alert(rule: str, n: int = 1, agent: str = "agent_a") -> Alert:
    return Alert(
        id=f"{rule}:call_{n}",
        rule=rule,
        agent_id=agent,
        text=f"[{rule}] call call_{n} of {agent}",
        at=AT,
        call_id=f"call_{n}",
        reason="error_llm_websocket_open" if rule == "error" else None,
    )


def config(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "alerts.toml"
    f.write_text(text)
    return f


def deliver(sender: WebhookSender, alerts: list[Alert], done: Callable[[], bool]) -> None:
    async def go() -> None:
        task = asyncio.create_task(sender.run())
        for a in alerts:
            sender.submit(a)
        while not done():
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(go(), 30))


def test_each_route_gets_its_rules_alerts_in_its_own_format(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with Receiver() as slack, Receiver() as generic, Receiver(status=202) as pagerduty:
        settings = WorkerSettings(
            alert_webhook_url=slack.url,
            alert_json_url=generic.url,
            pagerduty_routing_key=KEY,
            pagerduty_url=pagerduty.url,
        )
        sender = WebhookSender(routing(load_config(config(tmp_path, ROUTED)), settings), backoff_s=0.01)
        sent = [alert("error"), alert("failed_dial", 2), alert("negative_sentiment", 3), alert("unsuccessful", 4)]
        # error -> pagerduty; failed_dial -> slack and json; negative_sentiment -> nowhere; unsuccessful -> slack
        deliver(sender, sent, lambda: sender.sent == 4)
        got_slack, got_json, got_pd = slack.received(), generic.received(), pagerduty.received()

    assert sorted((b["alert"]["id"], b["text"]) for b in got_slack) == [
        ("failed_dial:call_2", sent[1].text),
        ("unsuccessful:call_4", sent[3].text),
    ]

    (pd,) = got_pd
    assert pd["routing_key"] == KEY and pd["event_action"] == "trigger" and pd["dedup_key"] == "error:call_1"
    payload = pd["payload"]
    assert payload["summary"] == sent[0].text
    assert payload["source"] == "agent_a"
    assert payload["severity"] == "error"  # the error rule's default severity
    assert payload["class"] == "error" and payload["custom_details"]["call_id"] == "call_1"
    assert datetime.fromisoformat(payload["timestamp"]).timestamp() * 1000 == AT

    (js,) = got_json
    assert js["id"] == "failed_dial:call_2" and js["rule"] == "failed_dial" and js["call_id"] == "call_2"
    assert js["severity"] == "warning" and js["text"] == sent[1].text and js["at"] == AT
    assert sender.outcomes == {("slack", "sent"): 2, ("json", "sent"): 1, ("pagerduty", "sent"): 1}
    assert KEY not in caplog.text


def test_retries_then_delivers_once_and_a_repeated_alert_is_not_sent_again(tmp_path: Path) -> None:
    with Receiver(status=202, fail_first=2) as pagerduty:
        settings = WorkerSettings(pagerduty_routing_key=KEY, pagerduty_url=pagerduty.url)
        rules = load_config(config(tmp_path, '[error]\nroute = "pagerduty"\n'))
        sender = WebhookSender(routing(rules, settings), backoff_s=0.01)
        a = alert("error")
        deliver(sender, [a, a], lambda: sender.sent == 1)
        sender.submit(a)  # after delivery too
        assert not sender._queue
        assert pagerduty.attempts == 3 and [b["dedup_key"] for b in pagerduty.received()] == [a.id]


def test_a_refusal_is_not_retried(tmp_path: Path) -> None:
    with Receiver(status=400) as generic:
        settings = WorkerSettings(alert_json_url=generic.url)
        rules = load_config(config(tmp_path, '[failure_rate]\nroute = "json"\n'))
        sender = WebhookSender(routing(rules, settings), backoff_s=0.01)
        deliver(sender, [alert("failure_rate")], lambda: sender.failed == 1)
        assert generic.attempts == 1 and sender.outcomes == {("json", "failed"): 1}


def test_without_a_route_a_rule_goes_to_slack_when_its_url_is_set() -> None:
    rules = load_config()
    assert not routing(rules, WorkerSettings()).active
    slack = routing(rules, WorkerSettings(alert_webhook_url="http://127.0.0.1:9/hook"))
    assert [r.name for r in slack.routes(alert("failed_dial"))] == ["slack"]


@pytest.mark.parametrize(
    "toml, settings, says",
    [
        ('[error]\nroute = "sms"\n', {}, "[error] route 'sms' is unknown (the routes are slack, pagerduty, json)"),
        ('[error]\nseverity = "fatal"\n', {}, "[error] severity 'fatal' is not one of critical, error, warning, info"),
        ('[error]\nroute = "pagerduty"\n', {}, "[error] routes to pagerduty, but CALLSTREAM_PAGERDUTY_ROUTING_KEY"),
        ('[failure_rate]\nroute = ["json"]\n', {}, "[failure_rate] routes to json, but CALLSTREAM_ALERT_JSON_URL"),
        ('[error]\nroute = "slack"\n', {}, "[error] routes to slack, but CALLSTREAM_ALERT_WEBHOOK_URL"),
        ('[error]\nroute = "json"\n', {"alert_json_url": "hooks.example.com/x"}, "CALLSTREAM_ALERT_JSON_URL is not an"),
    ],
)
def test_configuration_errors_name_the_rule_and_the_setting(
    tmp_path: Path, toml: str, settings: dict[str, str], says: str
) -> None:
    with pytest.raises(AlertConfigError) as err:
        routing(load_config(config(tmp_path, toml)), WorkerSettings(**settings))  # type: ignore[arg-type]
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_disabled_rule_needs_no_route_setting(tmp_path: Path) -> None:
    rules = load_config(config(tmp_path, '[error]\nenabled = false\nroute = "pagerduty"\n'))
    assert not routing(rules, WorkerSettings()).active
