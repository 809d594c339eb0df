"""Records the sinks cannot load go to `<prefix>.dead_letter`, with the reason and where they came from."""

from __future__ import annotations

import logging

from confluent_kafka import Message, Producer

from kernel.catalogue import Header
from warehouse.errors import WarehouseError

log = logging.getLogger(__name__)


class DeadLetters:
    """A producer made on the first dead letter; `confirm` before the batch holding them is committed."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.count = 0
        self._producer: Producer | None = None

    def send(self, msg: Message, reason: str) -> None:
        if self._producer is None:
            self._producer = Producer({"bootstrap.servers": self.bootstrap, "enable.idempotence": True})
        headers = [
            (Header.REASON, reason.encode()),
            ("source_topic", str(msg.topic()).encode()),
            ("source_partition", str(msg.partition()).encode()),
            ("source_offset", str(msg.offset()).encode()),
        ]
        self._producer.produce(self.topic, value=msg.value(), key=msg.key(), headers=[*(msg.headers() or []), *headers])
        self.count += 1
        log.warning("dead-lettered %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), reason)

    def confirm(self, timeout: float = 30.0) -> None:
        """Raise unless Kafka acknowledged every dead letter sent so far: their batch must not commit without them."""
        if self._producer is not None and self._producer.flush(timeout) > 0:
            raise WarehouseError("the dead-letter topic did not acknowledge; not committing this batch")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
