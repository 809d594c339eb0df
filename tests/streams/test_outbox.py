"""The alert outbox without Kafka: delivery after the batch is durable, and after a recovery."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from streams.outbox import Outbox
from streams.processor import Alert, DictStore, Pending, outbox_key

NOW = 1_790_000_000_000


class Store(DictStore):
    def __init__(self) -> None:
        super().__init__()
        self.deletes: list[tuple[int, list[bytes]]] = []

    async def write_now(self, partition: int, key: bytes, value: bytes | None) -> asyncio.Future[Any]:
        self.put(partition, key, value)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    async def delete_now(self, partition: int, keys: list[bytes]) -> asyncio.Future[Any]:
        self.deletes.append((partition, list(keys)))
        for key in keys:
            self.put(partition, key, None)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut


class Poster:
    """The webhook sender's interface: records what it was given, done at once."""

    def __init__(self, url: str | None = "http://hook") -> None:
        self.url = url
        self.on_done: Callable[[Alert], None] | None = None
        self.posted: list[str] = []

    def posts(self, alert: Alert) -> bool:
        return self.url is not None

    def submit(self, alert: Alert) -> None:
        self.posted.append(alert.id)
        assert self.on_done is not None
        asyncio.get_running_loop().call_soon(self.on_done, alert)


def _alert(n: int) -> Alert:
    return Alert(id=f"error:call_{n}", rule="error", agent_id="a", text=f"alert {n}", at=NOW, call_id=f"call_{n}")


def _outbox(store: Store, poster: Poster, on_topic: set[str]) -> tuple[Outbox, list[str]]:
    published: list[str] = []

    async def publish(alerts: list[Alert]) -> None:
        published.extend(alert.id for alert in alerts)

    return Outbox(store, publish, poster, lambda since: set(on_topic)), published


async def _settle(outbox: Outbox) -> None:
    for _ in range(200):
        if not outbox.stats().pending:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"still delivering: {outbox.stats()}")


def test_a_batchs_alerts_go_out_only_once_its_writes_are_acknowledged() -> None:
    store, poster = Store(), Poster()
    for n in (1, 2):
        store.put(0, outbox_key(0, _alert(n).id), msgspec.msgpack.encode(Pending(_alert(n), NOW)))
    outbox, published = _outbox(store, poster, set())

    async def go() -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        outbox.committed(0, [_alert(1), _alert(2)], written)
        await asyncio.sleep(0.05)
        assert published == [] and poster.posted == []  # the batch is not durable yet
        written.set_result(None)
        await _settle(outbox)

    asyncio.run(go())
    assert sorted(published) == sorted(poster.posted) == ["error:call_1", "error:call_2"]
    assert not list(store.keys_with_prefix(b"a:"))  # delivered: the entries are deleted
    assert outbox.stats().delivered == 2


def test_after_a_recovery_what_is_on_the_topic_is_posted_not_published_again() -> None:
    store, poster = Store(), Poster()
    for n, partition in ((1, 0), (2, 0), (3, 1)):
        store.put(partition, outbox_key(partition, _alert(n).id), msgspec.msgpack.encode(Pending(_alert(n), NOW)))
    outbox, published = _outbox(store, poster, on_topic={"error:call_1"})

    async def go() -> None:
        await outbox.recovered([0])  # partition 1 belongs to another worker
        await _settle(outbox)

    asyncio.run(go())
    assert published == ["error:call_2"]
    assert sorted(poster.posted) == ["error:call_1", "error:call_2"]
    assert list(store.keys_with_prefix(b"a:")) == [outbox_key(1, "error:call_3")]
    s = outbox.stats()
    assert (s.recovered, s.already_published, s.delivered) == (2, 1, 2)


def test_an_entry_a_replay_brings_back_after_its_delivery_is_deleted_not_sent_again() -> None:
    store, poster = Store(), Poster(url=None)  # no webhook: the topic only
    key = outbox_key(0, _alert(1).id)
    entry = msgspec.msgpack.encode(Pending(_alert(1), NOW))
    store.put(0, key, entry)
    outbox, published = _outbox(store, poster, set())

    async def go() -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        written.set_result(None)
        outbox.committed(0, [_alert(1)], written)
        await _settle(outbox)
        store.restore(0, key, entry)  # a rebalance replayed the changelog from before the tombstone
        await outbox.recovered([0])
        await _settle(outbox)

    asyncio.run(go())
    assert published == ["error:call_1"] and poster.posted == []
    assert key not in store.data


def _batch_of_three(store: Store, poster: Poster) -> tuple[Outbox, list[Alert], list[list[str]]]:
    calls: list[list[str]] = []
    alerts = [_alert(n) for n in (1, 2, 3)]
    for alert in alerts:
        store.put(0, outbox_key(0, alert.id), msgspec.msgpack.encode(Pending(alert, NOW)))

    async def publish(batch: list[Alert]) -> None:
        calls.append([a.id for a in batch])

    return Outbox(store, publish, poster, lambda since: set()), alerts, calls


@pytest.mark.parametrize("routes", [True, False])
def test_a_batchs_alerts_of_one_partition_are_published_together(routes: bool) -> None:
    """Published in one go; without a route deleted in one write, with routes each as its POST ends."""
    store, poster = Store(), Poster(url="http://hook" if routes else None)
    outbox, alerts, calls = _batch_of_three(store, poster)

    async def go() -> None:
        outbox.committed(0, alerts, None)
        await _settle(outbox)

    asyncio.run(go())
    assert calls == [[a.id for a in alerts]]
    keys = [outbox_key(0, a.id) for a in alerts]
    if routes:
        assert sorted(store.deletes) == sorted((0, [k]) for k in keys)
        assert poster.posted == [a.id for a in alerts]
    else:
        assert store.deletes == [(0, keys)] and poster.posted == []
    assert outbox.stats().delivered == 3


class SlowPoster(Poster):
    """Done with every alert but `held` (an endpoint that hangs on that one)."""

    def __init__(self, held: str) -> None:
        super().__init__()
        self.held = held

    def submit(self, alert: Alert) -> None:
        self.posted.append(alert.id)
        if alert.id != self.held:
            assert self.on_done is not None
            asyncio.get_running_loop().call_soon(self.on_done, alert)


def test_an_alert_whose_post_ended_is_deleted_while_another_of_its_batch_still_posts() -> None:
    """A crash now could repost only the hanging one: the others are settled."""
    store = Store()
    poster = SlowPoster(held=_alert(2).id)
    outbox, alerts, _ = _batch_of_three(store, poster)

    async def go() -> None:
        outbox.committed(0, alerts, None)
        for _ in range(100):
            if outbox.stats().delivered == 2:
                break
            await asyncio.sleep(0.005)

    asyncio.run(go())
    assert sorted(store.deletes) == sorted((0, [outbox_key(0, a.id)]) for a in alerts if a.id != poster.held)
    assert outbox.stats().delivered == 2 and outbox.stats().pending == 1
