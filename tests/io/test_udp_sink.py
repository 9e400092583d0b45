"""io/udp_sink.py: the datapath's send logic runs against a SinkSocket and the sends are counted."""

from __future__ import annotations

import numpy as np

from udpflannel.io.udp_sink import SinkSocket


def test_sends_are_counted_as_a_socket_would_take_them() -> None:
    sock = SinkSocket(headroom=64)
    dest = ("198.18.0.2", 8472)
    data = np.zeros(10 * 1400 + 500, np.uint8)
    assert sock.send_packed(data, 1400, dest) == 11  # one UDP_SEGMENT message: 10 full datagrams and a rest
    assert sock.send_one(b"x" * 60, dest) == 1
    assert sock.sendmmsg([(b"a" * 40, dest), (b"b" * 41, dest)]) == 2
    assert sock.stats.sent == 14
    assert sock.stats.send_calls == 3
