"""wg_io helpers on loopback sockets (no root): a contiguous peer batch sent with UDP_SEGMENT arrives as
its datagrams (and the same without GSO), and TUN writes are counted in packets."""

from __future__ import annotations

import socket

import numpy as np

from udpflannel.dataplane.wg_io import packets_in_writes, send_contiguous
from udpflannel.io.udp import UdpSocket
from udpflannel.packet.vnet import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VnetHdr


def batch(seg: int, n: int, last: int) -> np.ndarray:
    data = np.arange(seg * (n - 1) + last, dtype=np.int64).astype(np.uint8)
    data[::seg] = np.arange(n, dtype=np.uint8)  # datagram i starts with byte i
    return data


def received(sock: socket.socket) -> list[bytes]:
    out = []
    sock.settimeout(0.5)
    try:
        for _ in range(1000):
            out.append(sock.recv(65536))
    except TimeoutError:
        pass
    return out


def test_send_contiguous_with_and_without_gso() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        UdpSocket.open(socket.AF_INET, "127.0.0.1", 0) as tx,
    ):
        rx.bind(("127.0.0.1", 0))
        dest = rx.getsockname()
        data = batch(300, 7, 120)
        expected = [data[i * 300 : (i + 1) * 300].tobytes() for i in range(7)]
        for gso in (True, False):
            tx.gso = gso and tx.gso
            calls = tx.stats.send_calls
            assert send_contiguous(tx, data, 300, dest) == 7
            assert received(rx) == expected
            if tx.gso:
                assert tx.stats.send_calls - calls == 1  # the whole batch in one sendmsg


def test_packets_in_writes_counts_segments() -> None:
    gso = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 100, 20, 16).encode()
    writes = [(gso + bytes(40 + 250),), (VnetHdr().encode(), bytes(60)), (gso + bytes(40 + 300),)]
    assert packets_in_writes(writes) == 3 + 1 + 3
