"""The Faust app: one consumer group over every event topic of a prefix."""

from __future__ import annotations

from typing import Any

import faust
import msgspec
from faust.web import Request, Response, View

from callstream.catalogue import EVENT_NAMES, UNKNOWN, topic
from streams.settings import WorkerSettings


class _Agent(msgspec.Struct):
    agent_id: str | None = None


class _Envelope(msgspec.Struct):
    event: str = ""
    call: _Agent | None = None
    chat: _Agent | None = None


_decoder = msgspec.json.Decoder(_Envelope)


def agent_of(body: bytes) -> str:
    try:
        env = _decoder.decode(body)
    except msgspec.MsgspecError:
        return "unknown"
    ref = env.call or env.chat
    return (ref.agent_id if ref else None) or "unknown"


def create_app(settings: WorkerSettings | None = None) -> faust.App:
    cfg = settings or WorkerSettings()
    app = faust.App(
        f"{cfg.app_id}-{cfg.topic_prefix}",
        broker=f"kafka://{cfg.kafka_bootstrap}",
        store="memory://",
        topic_partitions=cfg.topic_partitions,
        value_serializer="raw",
        key_serializer="raw",
        web_host=cfg.web_host,
        web_port=cfg.web_port,
        datadir=cfg.data_dir,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
    )
    topics = [app.topic(topic(cfg.topic_prefix, e)) for e in (*EVENT_NAMES, UNKNOWN)]
    counts = app.Table("event_counts", default=int, key_type=str, value_type=int, partitions=cfg.topic_partitions)

    @app.agent(channel=app.topic(*[t.get_topic_name() for t in topics], value_type=bytes, key_type=bytes))
    async def count(stream: Any) -> None:
        async for event in stream.events():
            headers = dict(event.headers or {})
            name = headers.get("event", b"unknown")
            name = name.decode() if isinstance(name, bytes) else str(name)
            counts[f"{name}|{agent_of(event.value)}"] += 1

    @app.page("/api/counts")
    class Counts(View):
        async def get(self, request: Request) -> Response:
            by_event: dict[str, int] = {}
            by_agent: dict[str, dict[str, int]] = {}
            for k, v in counts.items():
                name, _, agent = k.partition("|")
                by_event[name] = by_event.get(name, 0) + v
                by_agent.setdefault(agent, {})[name] = v
            return self.json({"events": by_event, "agents": by_agent})

    return app
