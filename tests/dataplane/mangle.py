"""Valid TCP traffic as a TUN hands it over, and small damage to it: the raw material of the engine fuzz tests
(test_engine_fuzz.py, test_wg_engine_fuzz.py). From 198.19.1.2 / fd00:198:0:1::2 to 198.19.2.3 /
fd00:198:0:2::3 (outbound) or back (inbound)."""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable

from udpflannel.packet import headers as h
from udpflannel.packet import reference
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VnetHdr,
)


def tcp(rng: random.Random, payload: int, mss: int, *, v6: bool, outbound: bool) -> tuple[bytes, VnetHdr]:
    """A TCP superpacket (timestamps option) as the TUN hands it over: partial checksum, GSO header.
    Outbound: from our subnet to the peer's; else the other way round (to be split into a train)."""
    a4, b4 = bytes([198, 19, 1, 2]), bytes([198, 19, 2, 3])
    a6 = socket.inet_pton(socket.AF_INET6, "fd00:198:0:1::2")
    b6 = socket.inet_pton(socket.AF_INET6, "fd00:198:0:2::3")
    src, dst = (a6, b6) if v6 else (a4, b4)
    if not outbound:
        src, dst = dst, src
    options = bytes([1, 1, 8, 10]) + struct.pack("!II", 123456, 654321)
    tcp_hdr = struct.pack("!HHIIBBHHH", 40000, 5201, rng.getrandbits(32), 77, 8 << 4, 0x10, 500, 0, 0)
    body = tcp_hdr + options + rng.randbytes(payload)
    if v6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(body), h.IPPROTO_TCP, 64, src, dst)
    else:
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0x4000, 64, 6, 0, src, dst))
        struct.pack_into("!H", ip, h.IPV4_CSUM, reference.checksum(bytes(ip)))
    pkt = bytearray(bytes(ip) + body)
    l3 = len(ip)
    struct.pack_into("!H", pkt, l3 + h.TCP_CSUM, reference.pseudo_header(pkt, h.IPPROTO_TCP, len(body)))
    kind = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    return bytes(pkt), VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, l3 + 32, mss, l3, h.TCP_CSUM)


def flip(rng: random.Random, data: bytearray, start: int, span: int) -> None:
    """Change one byte in data[start : start + span]: a bit, a random value, or a telling one."""
    i = start + rng.randrange(max(1, min(span, len(data) - start)))
    if i >= len(data):
        return
    r = rng.random()
    if r < 0.5:
        data[i] ^= 1 << rng.randrange(8)
    elif r < 0.8:
        data[i] = rng.randrange(256)
    else:
        data[i] = rng.choice([0, 0xFF, 0x45, 0x60, 6, 17, 0x10, 0x18, 0x01])


def tun_reads(rng: random.Random, put: Callable[[bytes, VnetHdr], None]) -> None:
    """A TUN read's worth of outbound packets to `put`: mostly 1-4 (superpackets of many sizes, bare ACKs,
    small data packets), sometimes a few dozen (the batch paths), most of them damaged."""
    count = rng.choice([1, 1, 2, 3, 4, 4, 12, 30])
    many = count > 4  # then mostly small packets, most of them sound: mixed batches
    for _ in range(count):
        v6 = rng.random() < 0.3
        kind = rng.random()
        if kind < (0.15 if many else 0.6):
            mss = rng.choice([1386, 1386, 500, 100, 1, 8, 1400, 1500])
            pkt, vh = tcp(rng, rng.randrange(0, 60000), mss, v6=v6, outbound=True)
        else:  # a bare ACK or a small data packet: partial checksum, no GSO
            pkt, vh = tcp(rng, 0 if kind < 0.8 else rng.randrange(1, 1400), 0, v6=v6, outbound=True)
            vh = VnetHdr(vh.flags, 0, 0, 0, vh.csum_start, vh.csum_offset)
        data = bytearray(pkt)
        if rng.random() < (0.3 if many else 0.7):
            for _ in range(rng.randrange(1, 4)):
                flip(rng, data, 0, 80)
        if rng.random() < 0.2:
            data = data[: rng.randrange(1, len(data) + 1)]
        if rng.random() < 0.3:
            fields = [vh.flags, vh.gso_type, vh.hdr_len, vh.gso_size, vh.csum_start, vh.csum_offset]
            i = rng.randrange(6)
            value = rng.choice(
                [0, 1, 3, 4, 5, 0x80, 0xFF, 6, 16, 20, 40, 52, 1386, 0xFFFF, rng.getrandbits(16)]
            )
            fields[i] = value & (0xFF if i < 2 else 0xFFFF)
            vh = VnetHdr(*fields)
        put(bytes(data), vh)
