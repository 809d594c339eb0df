"""One delivery from bytes to Kafka: verify, route, publish. No HTTP here; errors name what is wrong."""

from __future__ import annotations

import ipaddress
import logging
import time

from gateway.errors import PayloadError, PublishError, SourceNotAllowed
from gateway.metrics import GatewayMetrics
from gateway.producer import EventProducer, Headers
from gateway.routing import Route, route
from gateway.settings import GatewaySettings
from kernel.catalogue import DEAD_LETTER, Header, topic
from kernel.signature import verify

log = logging.getLogger(__name__)


class Ingest:
    def __init__(self, settings: GatewaySettings, producer: EventProducer, metrics: GatewayMetrics) -> None:
        self.prefix = settings.topic_prefix
        self.keys = settings.keys()
        self.unsigned_ok = settings.allow_unsigned and not self.keys
        self.producer = producer
        self.metrics = metrics
        self.allowed = [ipaddress.ip_network(s, strict=False) for s in settings.allowed_source_list()]
        self.proxies = [ipaddress.ip_network(s, strict=False) for s in settings.trusted_proxy_list()]
        self.dead_letter_topic = topic(self.prefix, DEAD_LETTER)

    def source_of(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The sender's address: the peer, or X-Forwarded-For's last untrusted hop behind our proxies."""
        if not peer or not forwarded_for or not self._in(peer, self.proxies):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        # Walk from the nearest hop back; the first one that is not our own proxy is the sender.
        for hop in reversed(hops):
            if not self._in(hop, self.proxies):
                return hop
        return hops[0] if hops else peer

    @staticmethod
    def _in(addr: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in n for n in nets)

    def check_source(self, source: str | None) -> None:
        if self.allowed and not (source and self._in(source, self.allowed)):
            raise SourceNotAllowed(f"source {source or 'unknown'} is not in CALLSTREAM_ALLOWED_SOURCES")

    async def accept(self, body: bytes, signature: str | None, source: str | None) -> Route:
        """Verify and publish one delivery; return its route once Kafka acknowledged it.

        A signed body that cannot be routed is published to the dead-letter topic and then
        `PayloadError` is raised, so the caller answers 4xx knowing the body is kept.
        """
        received_at = str(int(time.time() * 1000)).encode()
        signed_at = received_at
        if not self.unsigned_ok:
            signed_at = str(verify(body, signature, self.keys)).encode()
        headers: Headers = [(Header.RECEIVED_AT, received_at), (Header.SIGNED_AT, signed_at)]
        if source:
            headers.append((Header.SOURCE_IP, source.encode()))
        try:
            r = route(body, self.prefix)
        except PayloadError as exc:
            await self._publish(
                self.dead_letter_topic,
                None,
                body,
                [(Header.EVENT, b""), (Header.REASON, str(exc).encode()), *headers],
            )
            raise
        try:
            await self._publish(r.topic, r.key, body, [(Header.EVENT, r.event.encode()), *headers])
        except PublishError as exc:
            exc.event = r.event if r.known else "unknown"
            raise
        log.debug("accepted event=%s key=%s topic=%s bytes=%d", r.event, r.key, r.topic, len(body))
        return r

    async def _publish(self, topic_name: str, key: str | None, body: bytes, headers: Headers) -> None:
        started = time.perf_counter()
        await self.producer.publish(topic_name, key, body, headers)
        self.metrics.produce_seconds.observe(time.perf_counter() - started)
