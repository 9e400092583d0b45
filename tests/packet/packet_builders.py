"""Hypothesis strategies and scapy builders for TCP/UDP superpackets as the kernel hands them to a TUN reader
(checksum field holding the pseudo-header sum, NEEDS_CSUM virtio header)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_EOL, IPOption_NOP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.reference import checksum, pseudo_header
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VnetHdr,
)

SRC4, DST4 = "198.19.1.2", "198.19.2.3"
SRC6, DST6 = "fd00:198::1:2", "fd00:198::2:3"

TCP_OPTIONS = [
    [],
    [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))],
    [("MSS", 1448), ("SAckOK", b""), ("WScale", 7)],
    [("NOP", None), ("NOP", None), ("SAck", (1000, 2000))],
]


@dataclass
class Super:
    """A superpacket: the packet bytes after the virtio header, the header, and what built it."""

    raw: bytes
    vh: VnetHdr
    payload: bytes
    v6: bool
    tcp: bool
    ip_id: int = 0
    seq: int = 0
    flags: int = 0

    def __repr__(self) -> str:  # the payload is up to 64 KiB: keep failure reports readable
        return f"Super(v6={self.v6}, tcp={self.tcp}, len={len(self.raw)}, vh={self.vh}, seq={self.seq})"


def payload_bytes(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


def partial_checksum(raw: bytes, l3: int, proto: int, col: int) -> bytes:
    """Put the pseudo-header sum in the L4 checksum field, as the kernel does for CHECKSUM_PARTIAL."""
    out = bytearray(raw)
    struct.pack_into("!H", out, l3 + col, pseudo_header(out, proto, len(out) - l3))
    return bytes(out)


def build_tcp(
    *,
    v6: bool,
    payload: bytes,
    mss: int,
    seq: int = 1000,
    ack: int = 77,
    flags: str = "A",
    options: list | None = None,
    ip_id: int = 1,
    tos: int = 0,
    ttl: int = 64,
    ip_options: bool = False,
    window: int = 500,
) -> Super:
    if v6:
        l3hdr = IPv6(src=SRC6, dst=DST6, tc=tos, hlim=ttl, fl=0x12345)
    else:
        opts = [IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_EOL()] if ip_options else []
        l3hdr = IP(src=SRC4, dst=DST4, id=ip_id, tos=tos, ttl=ttl, flags="DF", options=opts)
    seg = TCP(sport=40000, dport=5201, seq=seq, ack=ack, flags=flags, window=window, options=options or [])
    raw = bytes(l3hdr / seg / Raw(payload)) if payload else bytes(l3hdr / seg)
    l3 = h.IPV6_HLEN if v6 else (raw[0] & 0xF) * 4
    hlen = l3 + (raw[l3 + h.TCP_DOFF] >> 4) * 4
    raw = partial_checksum(raw, l3, h.IPPROTO_TCP, h.TCP_CSUM)
    kind = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    vh = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, hlen, mss, l3, h.TCP_CSUM)
    return Super(raw, vh, payload, v6, True, ip_id, seq, int(TCP(raw[l3:]).flags))


def build_udp(*, v6: bool, payload: bytes, mss: int, ip_id: int = 1) -> Super:
    l3hdr = IPv6(src=SRC6, dst=DST6) if v6 else IP(src=SRC4, dst=DST4, id=ip_id)
    # Not 8472: once scapy.all is imported (other test modules do), scapy dissects that port's payload as
    # VXLAN, and re-dissecting random bytes that way is lossy, so scapy cross-checks would flake.
    raw = bytes(l3hdr / UDP(sport=40000, dport=40001) / Raw(payload))
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    raw = partial_checksum(raw, l3, h.IPPROTO_UDP, h.UDP_CSUM)
    vh = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, l3 + h.UDP_HLEN, mss, l3, h.UDP_CSUM)
    return Super(raw, vh, payload, v6, False, ip_id)


@st.composite
def tcp_superpackets(draw: st.DrawFn, *, v6: bool | None = None, gro_flags: bool = False) -> Super:
    v6 = draw(st.booleans()) if v6 is None else v6
    n = draw(st.one_of(st.integers(0, 3000), st.integers(0, 3000), st.integers(3000, 63000)))
    mss = draw(st.integers(max(64, -(-n // 1000)), 9000))
    flags = draw(st.sampled_from(["A", "PA"] if gro_flags else ["A", "PA", "FA", "FPA", "CA", "CPA", "EA"]))
    return build_tcp(
        v6=v6,
        payload=payload_bytes(draw(st.integers(0, 2**32 - 1)), n),
        mss=mss,
        seq=draw(st.integers(0, 2**32 - 1)),
        ack=draw(st.integers(0, 2**32 - 1)),
        flags=flags,
        options=draw(st.sampled_from(TCP_OPTIONS)),
        ip_id=draw(st.integers(0, 0xFFFF)),
        tos=draw(st.integers(0, 255)),
        ttl=draw(st.integers(1, 255)),
        ip_options=(not v6) and (not gro_flags) and draw(st.booleans()),
        window=draw(st.integers(0, 0xFFFF)),
    )


@st.composite
def udp_superpackets(draw: st.DrawFn) -> Super:
    v6 = draw(st.booleans())
    n = draw(st.integers(0, 60000))
    mss = draw(st.integers(max(8, -(-n // 1000)), 9000))
    payload = payload_bytes(draw(st.integers(0, 2**32 - 1)), n)
    return build_udp(v6=v6, payload=payload, mss=mss, ip_id=draw(st.integers(0, 0xFFFF)))


@st.composite
def gro_superpackets(draw: st.DrawFn, *, v6: bool, mss: int, options: list, max_segments: int = 44) -> Super:
    """A superpacket of one TCP flow that splits into 2..max_segments segments (the last one 1..mss bytes,
    often all mss), flags ACK or PSH|ACK: what a peer's split hands a GRO receiver as one train."""
    k = draw(st.integers(2, min(max_segments, 60000 // mss)))
    n = (k - 1) * mss + draw(st.one_of(st.just(mss), st.integers(1, mss)))  # often whole segments, as TSO
    return build_tcp(
        v6=v6,
        payload=payload_bytes(draw(st.integers(0, 2**32 - 1)), n),
        mss=mss,
        seq=draw(st.integers(0, 2**32 - 1)),
        flags=draw(st.sampled_from(["A", "PA"])),
        options=options,
        ip_id=draw(st.integers(0, 0xFFFF)),
        window=draw(st.integers(0, 0xFFFF)),
    )


def fix_checksums(seg: bytearray, v6: bool) -> None:
    """Make a deliberately changed TCP segment (IPv4 without options, or IPv6) sound again: its IP length,
    IPv4 header checksum and TCP checksum, so that only the change itself can make a receiver refuse it."""
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    if v6:
        struct.pack_into("!H", seg, h.IPV6_PAYLOAD_LEN, len(seg) - l3)
    else:
        struct.pack_into("!H", seg, h.IPV4_TOTAL_LEN, len(seg))
        struct.pack_into("!H", seg, h.IPV4_CSUM, 0)
        struct.pack_into("!H", seg, h.IPV4_CSUM, checksum(bytes(seg[:l3])))
    struct.pack_into("!H", seg, l3 + h.TCP_CSUM, 0)
    l4 = bytes(seg[l3:])
    struct.pack_into(
        "!H", seg, l3 + h.TCP_CSUM, checksum(l4, pseudo_header(bytes(seg), h.IPPROTO_TCP, len(l4)))
    )


VXLAN_PREFIX = bytes(range(100, 122))  # 22 bytes, as VXLAN + inner Ethernet in front of every packet


def received_train(pkts: list[bytes], prefix: bytes = VXLAN_PREFIX, *, packed: bool = True) -> PacketBatch:
    """`pkts` behind `prefix` as the rows of a receive train: end to end as a UDP_GRO receive lays them out
    (packed: each row's next byte the next row's first), or padded rows (PacketBatch.from_packets)."""
    rows = [prefix + p for p in pkts]
    if not packed:
        return PacketBatch.from_packets(rows)
    stride = len(rows[0])
    flat = np.zeros(stride * len(rows) + 64, np.uint8)
    for i, r in enumerate(rows):
        flat[i * stride : i * stride + len(r)] = np.frombuffer(r, np.uint8)
    buf = np.lib.stride_tricks.as_strided(flat, shape=(len(rows), stride), strides=(stride, 1))
    return PacketBatch(buf, np.array([len(r) for r in rows], np.int32), 0, len(rows))
