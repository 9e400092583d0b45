"""wg_io: TUN writes are counted in packets (a peer batch's UDP_SEGMENT send is UdpSocket.send_packed,
tested in tests/io/test_udp_io.py)."""

from __future__ import annotations

from udpflannel.dataplane.wg_io import packets_in_writes
from udpflannel.packet.vnet import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VnetHdr


def test_packets_in_writes_counts_segments() -> None:
    gso = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 100, 20, 16).encode()
    writes = [(gso + bytes(40 + 250),), (VnetHdr().encode(), bytes(60)), (gso + bytes(40 + 300),)]
    assert packets_in_writes(writes) == 3 + 1 + 3
