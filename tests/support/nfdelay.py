"""Added latency on a link, for kernels without `tc netem`: packets wait in an NFQUEUE until due.

An iptables rule (`-j NFQUEUE --queue-num N --queue-bypass`) hands every packet it matches to queue
N; this process binds the queue over netlink (no library: the nfnetlink_queue messages are a few
structs), notes when each packet arrived, and lets it go `delay` later. The delay is the same for
every packet, so they leave in the order they came and one batch verdict releases all that are due.
Loss is the iptables `statistic` match's job, before the queue. Runs inside the namespace whose
packets it holds (`ip netns exec`); SIGTERM ends it, and the rule's --queue-bypass lets packets
through again once nobody listens.

    python -m tests.support.nfdelay --queue 7 --delay-ms 200
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
QUEUE_MAXLEN = 65536


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(kind: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body


class Queue:
    """One bound NFQUEUE: packets in, batch verdicts out."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: root may exceed rmem_max
        self.sock.bind((0, 0))
        cmd = struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)
        self._config(_attr(NFQA_CFG_CMD, cmd))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)))
        self._config(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)))

    def _config(self, attrs: bytes) -> None:
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.number, attrs, NLM_F_REQUEST | NLM_F_ACK))
        reply = self.sock.recv(65536)
        kind = struct.unpack_from("=H", reply, 4)[0]
        code = struct.unpack_from("=i", reply, 16)[0] if kind == NLMSG_ERROR else 0
        if code:
            raise OSError(-code, f"nfnetlink_queue config of queue {self.number}: {os.strerror(-code)}")

    def packet_ids(self) -> list[int]:
        """The ids of the packets that arrived (several netlink messages may share a read)."""
        data = self.sock.recv(1 << 20)
        ids, at = [], 0
        while at + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, at)
            if kind & 0xFF == NFQNL_MSG_PACKET and kind >> 8 == NFNL_SUBSYS_QUEUE:
                ids.extend(self._packet_id(data, at + 20, at + length))
            at += (length + 3) & ~3
            if length == 0:
                break
        return ids

    @staticmethod
    def _packet_id(data: bytes, at: int, end: int) -> list[int]:
        while at + 4 <= end:
            alen, akind = struct.unpack_from("=HH", data, at)
            if akind & 0x7FFF == NFQA_PACKET_HDR:
                return [struct.unpack_from("!I", data, at + 4)[0]]
            at += (alen + 3) & ~3
            if alen == 0:
                break
        return []

    def release_through(self, packet_id: int) -> None:
        """Accept every queued packet up to and including `packet_id`."""
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        self.sock.send(_message(NFQNL_MSG_VERDICT_BATCH, self.number, attrs))


def run(queue: Queue, delay: float) -> None:
    held: collections.deque[tuple[float, int]] = collections.deque()
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else 1.0
        readable, _, _ = select.select([queue.sock], [], [], timeout)
        if readable:
            due = time.monotonic() + delay
            held.extend((due, pid) for pid in queue.packet_ids())
        now, last = time.monotonic(), None
        while held and held[0][0] <= now:
            last = held.popleft()[1]
        if last is not None:
            queue.release_through(last)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    queue = Queue(args.queue)
    print(f"nfdelay: queue {args.queue} bound, {args.delay_ms:g} ms", flush=True)
    run(queue, args.delay_ms / 1000)


if __name__ == "__main__":
    main(sys.argv[1:])
