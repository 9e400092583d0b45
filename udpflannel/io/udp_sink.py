"""A UdpSocket with no socket behind it, for measuring the datapath in one process (perf/engine_micro.py) and
for tests: the datapath's own send logic runs to the last step, and the sends are counted instead of made."""

from __future__ import annotations

import socket

from udpflannel.io.udp import UdpSocket, UdpStats


class SinkSocket(UdpSocket):
    """Every send succeeds at once: stats count the calls and datagrams a real socket would have taken."""

    def __init__(self, headroom: int, family: int = socket.AF_INET, max_segments: int = 128) -> None:
        super().__init__(None, family, True, True, max_segments, 65507, 64, headroom)  # type: ignore[arg-type]
        self.stats = UdpStats()

    def _sendmsg(self, bufs, anc, dest, *, datagrams: int) -> int:
        self.stats.send_calls += 1
        self.stats.sent += datagrams
        return datagrams

    def _sendmmsg_raw(self, hdrs, m: int) -> int:
        self.stats.send_calls += 1
        return m

    def _sendmmsg_prepared(self, hdrs, iov, n: int, keep: object) -> int:
        self.stats.send_calls += 1
        self.stats.sent += n
        return n

    def send_one(self, datagram, dest) -> int:
        self.stats.send_calls += 1
        self.stats.sent += 1
        return 1
