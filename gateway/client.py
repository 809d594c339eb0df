"""One librdkafka producer, the thread that polls it, and the asyncio futures of its messages.

`EventProducer` owns one `Client` at a time and replaces it when librdkafka reports a fatal error.
Every error the client meets, from `error_cb` or from `poll`, goes through one door: `report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from gateway.errors import PublishError

Headers = list[tuple[str, str | bytes | None]]


def is_fatal(err: KafkaError) -> bool:
    """librdkafka's fatal error itself (`fatal()`), or `_FATAL`, which `produce` raises after one."""
    return bool(err.fatal()) or err.code() == KafkaError._FATAL


def _settle(fut: asyncio.Future[None], err: KafkaError | None) -> None:
    if fut.done():  # the request gave up already (timeout, Kafka down, client gone)
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(PublishError(f"Kafka refused the message: {err.str()}"))


class Client:
    """A confluent-kafka `Producer` whose delivery reports resolve asyncio futures on their loop."""

    def __init__(self, conf: dict[str, Any], on_error: Callable[[Client, KafkaError], None]) -> None:
        self._on_error = on_error
        # Futures of messages produced and not yet settled; touched on the event loop only.
        self.pending: set[asyncio.Future[None]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.producer = Producer({**conf, "error_cb": self.report})
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="kafka-delivery-poller", daemon=True)

    def start(self) -> None:
        """Start serving delivery reports and errors; the owner adopts the client first, since
        librdkafka's first error (a broker down at start-up) may come at once."""
        self._poller.start()

    def report(self, err: KafkaError) -> None:
        """The error path: librdkafka's `error_cb`, and what `poll` or `produce` raised."""
        self._on_error(self, err)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.producer.poll(0.05)
            except KafkaException as exc:
                # confluent-kafka raises a fatal error from poll() instead of calling error_cb.
                err: KafkaError = exc.args[0]
                self.report(err)
                if is_fatal(err):
                    return
            except Exception as exc:  # a poller that died silently would leave every request to time out
                self.report(KafkaError(KafkaError._FATAL, f"the delivery poller failed: {exc!r}", fatal=True))
                return

    def produce(self, topic: str, key: str | None, value: bytes, headers: Headers) -> asyncio.Future[None]:
        """Hand one message to librdkafka; the future settles with its delivery report."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            # Once per message: a bare try costs nothing, contextlib.suppress builds an object.
            try:  # noqa: SIM105
                loop.call_soon_threadsafe(_settle, fut, err)
            except RuntimeError:  # the loop is closed: nobody waits for this answer any more
                pass

        self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
        self.pending.add(fut)
        self.loop = loop
        return fut

    def fail_pending_soon(self, error: Callable[[], PublishError]) -> None:
        """From any thread: fail, on their loop, the futures whose delivery report has not come."""
        loop = self.loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._fail_pending, error)

    def _fail_pending(self, error: Callable[[], PublishError]) -> None:
        for fut in self.pending:
            if not fut.done():
                fut.set_exception(error())
        self.pending.clear()

    def reachable(self, timeout: float) -> bool:
        """True when a broker answers a metadata request within `timeout` seconds."""
        try:
            self.producer.list_topics(timeout=timeout)
        except KafkaException:
            return False
        return True

    def stop_polling(self) -> None:
        self._stop.set()
        if self._poller.is_alive() and self._poller is not threading.current_thread():
            self._poller.join(timeout=2)

    def retire(self, timeout: float = 2.0) -> None:
        """After a fatal error: void what it still holds and serve the last delivery reports.

        A message the broker acknowledged still gets its success; every other one fails, so its
        sender gets a 503 and retries.
        """
        self.stop_polling()
        with contextlib.suppress(KafkaException, RuntimeError):
            self.producer.purge(in_queue=True, in_flight=True, blocking=False)
        # A fatal error the poller had not served yet is raised by the first flush; the second
        # serves the delivery reports behind it.
        for _ in range(2):
            try:
                self.producer.flush(timeout)
                break
            except KafkaException as exc:
                self.report(exc.args[0])
            except SystemError as exc:  # confluent-kafka ran a callback with the fatal error raised
                if isinstance(exc.__cause__, KafkaException):
                    self.report(exc.__cause__.args[0])
        if hasattr(self.producer, "close"):  # confluent-kafka >= 2.13; before, dropping it destroys it
            with contextlib.suppress(RuntimeError):
                self.producer.close()

    def close(self, timeout: float) -> int:
        """Flush what is queued and stop the poller; return how many messages were still unsent."""
        remaining = self.producer.flush(timeout)
        self.stop_polling()
        return int(remaining)
