"""Stop the broker in the middle of a load run: only 503s while it is down, recovery by itself, and
every delivery that got a 204 is on its topic afterwards. Uses a broker of its own, never the
session broker, since it stops it."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import httpx
import orjson
import pytest

from callstream.localkafka import LocalKafka
from kernel.signature import sign
from kernel.topics import ensure_topics
from tests.support.kafka import consume_all, topic_counts

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@dataclass
class Delivery:
    body: bytes
    sent: float
    done: float
    status: int
    retry_after: str | None


async def _load(url: str, key: str, stop: asyncio.Event, out: list[Delivery], rate: float = 100) -> None:
    sem = asyncio.Semaphore(48)
    async with httpx.AsyncClient(timeout=10) as client:

        async def one(n: int) -> None:
            body = orjson.dumps(
                {
                    "event": "call_started",
                    "call": {
                        "call_id": f"call_{n:06d}_{uuid.uuid4().hex}",
                        "agent_id": "agent_r",
                        "call_status": "ongoing",
                    },
                }
            )
            t0 = time.monotonic()
            try:
                r = await client.post(url, content=body, headers={"x-retell-signature": sign(body, key)})
                status, ra = r.status_code, r.headers.get("retry-after")
            except httpx.HTTPError:
                status, ra = 0, None
            out.append(Delivery(body, t0, time.monotonic(), status, ra))
            sem.release()

        tasks = []
        n = 0
        start = time.monotonic()
        while not stop.is_set():
            await sem.acquire()
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)


def test_broker_outage_mid_load(own_broker: LocalKafka, make_gateway, api_key, prefix):
    ensure_topics(own_broker.bootstrap, prefix, partitions=3)
    gw = make_gateway(CALLSTREAM_KAFKA_BOOTSTRAP=own_broker.bootstrap, CALLSTREAM_PUBLISH_TIMEOUT_S="2")
    gw.wait_http("/readyz", ok=lambda r: r.status_code == 200)
    out: list[Delivery] = []
    marks: dict[str, float] = {}

    async def scenario() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(_load(gw.url + "/webhook", api_key, stop, out))
        await asyncio.sleep(5)
        marks["stopping"] = time.monotonic()
        await asyncio.to_thread(own_broker.stop)
        marks["down"] = time.monotonic()
        await asyncio.sleep(8)
        marks["starting"] = time.monotonic()
        await asyncio.to_thread(own_broker.start, 120)
        marks["up"] = time.monotonic()
        # Keep the load on until the gateway has answered 204 for 5 s in a row after the restart.
        while True:
            await asyncio.sleep(1)
            recent = [d for d in out if d.sent > time.monotonic() - 5]
            if time.monotonic() - marks["up"] > 5 and recent and all(d.status == 204 for d in recent):
                break
            assert time.monotonic() - marks["up"] < 90, "the gateway did not recover within 90 s"
        stop.set()
        await load

    asyncio.run(scenario())

    statuses = {d.status for d in out}
    assert statuses <= {204, 503}, f"statuses other than 204/503: {statuses}"
    assert all(d.retry_after for d in out if d.status == 503)
    while_down = [d for d in out if d.sent >= marks["down"] and d.done <= marks["starting"]]
    assert while_down and all(d.status == 503 for d in while_down)
    first_ok_after = min(d.done for d in out if d.status == 204 and d.sent >= marks["down"])
    ok = [d for d in out if d.status == 204]
    # Late deliveries of 503'd bodies are on the topic too: read everything there is, not len(ok).
    total = topic_counts(own_broker.bootstrap, prefix)["call_started"]
    msgs = consume_all(own_broker.bootstrap, f"{prefix}.call_started", expect=total, timeout=60)
    assert len(msgs) == total
    stored = {m.value() for m in msgs}
    missing = [d for d in ok if d.body not in stored]
    late = sum(1 for d in out if d.status == 503 and d.body in stored)
    print(
        f"\noutage figures: {len(out)} deliveries, {len(ok)} answered 204, {len(out) - len(ok)} answered 503 "
        f"({len(while_down)} sent and answered while the broker was down, all 503); broker down "
        f"{marks['starting'] - marks['down']:.1f}s, restart took {marks['up'] - marks['starting']:.1f}s; first 204 "
        f"{first_ok_after - marks['up']:+.1f}s after the broker answered; {len(msgs)} messages on the topic, "
        f"{len(ok) - len(missing)}/{len(ok)} of the 204s found; {late} of the 503s stored anyway (delivered late; "
        "the sender's retry makes a duplicate, never a loss)"
    )
    assert not missing, f"{len(missing)} deliveries answered 204 are not on the topic"
