"""EventProducer's gate and its healing, on librdkafka's in-process mock cluster (no broker needed).

Errors are injected where librdkafka's own land: the client's error path (`Client.report`, which
`error_cb` and the poll loop call), `produce` raising, and librdkafka's fatal-error test hook.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from gateway.errors import KafkaUnavailable, PublishError, PublishTimeout
from gateway.producer import EventProducer
from tests.gateway.librdkafka import trigger_fatal

# One mock broker per librdkafka client, answering after 300 ms: long enough that a message is
# still in flight when the test injects an error.
MOCK = {"test.mock.num.brokers": 1, "test.mock.broker.rtt": 300}
FENCED = KafkaError(KafkaError._FENCED, "fenced by a newer instance", fatal=True)
ALL_DOWN = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")


@pytest.fixture
def producer() -> Iterator[EventProducer]:
    p = EventProducer("mock", timeout_s=30, extra=MOCK, recheck_s=0.1)
    try:
        yield p
    finally:
        p.close(timeout=5)


def _until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {timeout:.0f}s"
        time.sleep(0.05)


def _publish(p: EventProducer, value: bytes = b"{}") -> None:
    asyncio.run(p.publish("t", "k", value, []))


async def _in_flight_then(p: EventProducer, inject: Callable[[], None]) -> BaseException | None:
    """Publish, inject an error while the message is in flight, and return how the publish ended."""
    task = asyncio.create_task(p.publish("t", "k", b"{}", []))
    await asyncio.sleep(0.05)  # produced, and the mock broker's answer is 300 ms away
    assert p.client.pending, "the message is not in flight"
    await asyncio.to_thread(inject)
    try:
        await task
    except PublishError as exc:
        return exc
    return None


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the producer logged at INFO or above."""
    return [r.getMessage() for r in caplog.records if r.name == "gateway.producer" and r.levelno >= logging.INFO]


def _healed(p: EventProducer, old: Any) -> None:
    _until(lambda: p.client is not old, "replaced")
    _until(lambda: p.unready_reason(timeout=1) is None, "ready")
    _publish(p)  # a new producer, and a delivery acknowledged by it
    assert p.rebuilds == 1


def test_a_fatal_error_on_the_error_path_replaces_the_producer(producer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    _publish(producer)
    old = producer.client
    got = asyncio.run(_in_flight_then(producer, lambda: old.report(FENCED)))
    # In flight on the dead producer: 503, never a 204 for a message nobody acknowledged.
    assert isinstance(got, PublishError)
    assert not isinstance(got, PublishTimeout)
    _healed(producer, old)
    [line] = _lines(caplog)
    assert "fatal error" in line and "fenced by a newer instance" in line


def test_requests_during_the_swap_are_refused_without_producing(producer) -> None:
    old = producer.client
    old.report(FENCED)
    # The gate closes before report() returns; it opens only once the new producer has had a
    # metadata answer from its broker, 300 ms away.
    with pytest.raises(KafkaUnavailable, match="fatal error"):
        _publish(producer)
    assert "fatal error" in (producer.unready_reason() or "")
    _healed(producer, old)


class _FatalOnProduce:
    """The client's producer, except that produce() raises what librdkafka raises after a fatal error."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def produce(self, *_args: Any, **_kwargs: Any) -> None:
        raise KafkaException(KafkaError(KafkaError._FATAL, "Fatal error: fenced"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_fatal_error_raised_by_produce_replaces_the_producer(producer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    old = producer.client
    old.producer = _FatalOnProduce(old.producer)
    with pytest.raises(PublishError, match="cannot produce"):
        _publish(producer)
    _healed(producer, old)
    assert len(_lines(caplog)) == 1


def test_a_real_librdkafka_fatal_error_raised_by_poll_replaces_the_producer(producer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    _publish(producer)
    old = producer.client
    got = asyncio.run(_in_flight_then(producer, lambda: trigger_fatal(old.producer, "test: fenced")))
    assert isinstance(got, PublishError)
    _healed(producer, old)
    [line] = _lines(caplog)
    assert "test: fenced" in line


def test_every_broker_down_refuses_at_once_and_heals_by_itself(producer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    _publish(producer)
    old = producer.client
    got = asyncio.run(_in_flight_then(producer, lambda: old.report(ALL_DOWN)))
    # Failed by the down signal, not left to the 30 s deadline.
    assert isinstance(got, KafkaUnavailable)
    # The mock broker answers, so the watchdog's metadata check opens the gate again.
    _until(lambda: producer.unready_reason(timeout=1) is None, "ready")
    _publish(producer)
    assert producer.client is old and producer.rebuilds == 0
    down, back = _lines(caplog)
    assert "no Kafka broker is reachable" in down and "answers again" in back


def test_while_the_gate_is_closed_publish_refuses_without_touching_librdkafka(producer) -> None:
    old = producer.client
    producer.recheck_s = 60  # keep it closed for the length of this test
    old.report(ALL_DOWN)
    old.producer = _FatalOnProduce(old.producer)  # would raise if produce were called
    for _ in range(3):
        with pytest.raises(KafkaUnavailable, match="1/1 brokers are down"):
            _publish(producer)
    assert "no Kafka broker is reachable" in (producer.unready_reason() or "")
    assert producer.rebuilds == 0


def test_a_transport_error_alone_closes_nothing(producer) -> None:
    producer.client.report(KafkaError(KafkaError._TRANSPORT, "127.0.0.1:9092/1: Disconnected"))
    assert producer.unready_reason(timeout=5) is None
    _publish(producer)


class _ProduceNoticesFirst(_FatalOnProduce):
    """A real fatal error that produce() meets before the poller has served it."""

    def produce(self, *args: Any, **kwargs: Any) -> None:
        trigger_fatal(self.real, "test: fenced while producing")
        super().produce(*args, **kwargs)


def test_the_log_line_names_the_fatal_error_even_when_produce_noticed_it_first(producer, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    old = producer.client
    old.stop_polling()  # so that nothing serves librdkafka's report of the error before produce() meets it
    old.producer = _ProduceNoticesFirst(old.producer)
    with pytest.raises(PublishError):
        _publish(producer)
    _healed(producer, old)
    [line] = _lines(caplog)
    assert "test: fenced while producing" in line
