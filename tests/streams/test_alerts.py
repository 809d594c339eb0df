"""Alert rules config, the failure-rate rule, and the webhook sender against a real local HTTP server."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from streams.alertroutes import Routing, routing
from streams.alertrules import load_config
from streams.alerts import WebhookSender, failure_rate_alerts
from streams.errors import AlertConfigError
from streams.metrics import ALL, Agg
from streams.processor import Alert
from streams.settings import WorkerSettings

NOW = 1_790_000_040_000 + 30_000


def test_defaults_and_override(tmp_path: Path) -> None:
    cfg = load_config()
    assert cfg.is_failed_dial("dial_no_answer") and cfg.is_failed_dial("sip_routing_error")
    assert cfg.is_failed_dial("telephony_provider_unavailable") and not cfg.is_failed_dial("user_hangup")
    assert cfg.is_error("error_asr")
    f = tmp_path / "alerts.toml"
    f.write_text("[failure_rate]\nthreshold = 0.2\n[negative_sentiment]\nenabled = false\n")
    over = load_config(f)
    assert over.failure_rate.threshold == 0.2 and over.failure_rate.min_calls == cfg.failure_rate.min_calls
    assert not over.negative_sentiment.enabled and over.error.enabled


@pytest.mark.parametrize("text, says", [("[error]\nenabld = true\n", "enabld"), ("[[x", "not valid TOML")])
def test_bad_config_names_the_problem(tmp_path: Path, text: str, says: str) -> None:
    f = tmp_path / "alerts.toml"
    f.write_text(text)
    with pytest.raises(AlertConfigError, match=says):
        load_config(f)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(AlertConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def _win(failed: int, finished: int) -> Agg:
    return Agg(counts={"failed": failed, "calls_finished": finished})


def test_failure_rate_threshold_min_count_and_throttle() -> None:
    rule = load_config().failure_rate  # 5 min window, > 50 %, at least 5 calls, 15 min throttle
    minute = NOW - NOW % 60_000
    windows = {
        minute: {"bad": _win(3, 3), "few": _win(2, 2), "ok": _win(1, 6), ALL: _win(6, 11)},
        minute - 60_000: {"bad": _win(1, 3)},
        minute - 10 * 60_000: {"few": _win(10, 10)},  # outside the window
    }
    last: dict[str, int] = {}
    got = failure_rate_alerts(rule, windows, NOW, last)
    assert [(a.agent_id, a.value) for a in got] == [("bad", round(4 / 6, 4))]
    assert failure_rate_alerts(rule, windows, NOW + 60_000, last) == []  # throttled
    assert len(failure_rate_alerts(rule, windows, NOW + 16 * 60_000 - 1, {})) == 0  # window moved on


class _Hook(BaseHTTPRequestHandler):
    fail_first = 0
    received: list[dict[str, Any]] = []
    calls = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).calls += 1
        if type(self).calls <= type(self).fail_first:
            self.send_response(503)
            self.end_headers()
            return
        type(self).received.append(body)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _slack(url: str) -> Routing:
    return routing(load_config(), WorkerSettings(alert_webhook_url=url))


def _alert(i: int) -> Alert:
    return Alert(id=f"error:call_{i}", rule="error", agent_id="a", text=f"alert {i}", at=NOW, call_id=f"call_{i}")


def test_webhook_retries_with_backoff_then_delivers_each_once() -> None:
    _Hook.fail_first, _Hook.received, _Hook.calls = 2, [], 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        sender = WebhookSender(_slack(f"http://127.0.0.1:{srv.server_port}/hook"), backoff_s=0.01, senders=1)

        async def go() -> None:
            task = asyncio.create_task(sender.run())
            sender.submit(_alert(1))
            sender.submit(_alert(2))
            while sender.sent < 2:
                await asyncio.sleep(0.01)
            task.cancel()

        asyncio.run(asyncio.wait_for(go(), 20))
    finally:
        srv.shutdown()
    assert [b["text"] for b in _Hook.received] == ["alert 1", "alert 2"]
    assert _Hook.received[0]["alert"]["id"] == "error:call_1"
    assert _Hook.calls == 4 and sender.failed == 0


def test_submit_never_blocks_when_the_endpoint_is_down() -> None:
    sender = WebhookSender(_slack("http://127.0.0.1:9/unreachable"), queue_size=3)
    for i in range(10):
        sender.submit(_alert(i))  # no event loop running the senders: must still return at once
    assert sender.dropped == 7
