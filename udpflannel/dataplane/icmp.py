"""ICMP errors the datapath sends back into the TUN: fragmentation needed / packet too big (a DF packet larger
than the tunnel MTU), net unreachable (udp backend, no route) and time exceeded.
Sans-I/O: bytes in, bytes out (which drops get an answer, and the answer).
Rare path, so plain Python per packet.
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np

from udpflannel.dataplane.spec import EngineConfig
from udpflannel.packet.drops import DropReason

ICMP_PROTO = 1
ICMPV6_NEXT_HEADER = 58
# RFC 792 / RFC 1191 types and codes
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
ICMP_FRAG_NEEDED = 4
ICMP_TIME_EXCEEDED = 11
# RFC 4443
ICMPV6_DEST_UNREACH = 1
ICMPV6_NO_ROUTE = 0
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3

IPV4_DF = 0x4000
ICMPV4_MAX_QUOTE = 576 - 20 - 8  # RFC 1812 4.3.2.3: the error fits in 576 bytes
ICMPV6_MAX_QUOTE = 1280 - 40 - 8  # RFC 4443 2.4(c): the error fits in the minimum IPv6 MTU
DEFAULT_TTL = 64


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: bytes, dst: bytes, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, DEFAULT_TTL, ICMP_PROTO, 0, src, dst)
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def _icmpv4(src: str, original: bytes, icmp_type: int, code: int, rest: int) -> bytes:
    body = struct.pack("!BBHI", icmp_type, code, 0, rest) + original[:ICMPV4_MAX_QUOTE]
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return _ipv4(ipaddress.IPv4Address(src).packed, original[12:16], body)


def _icmpv6(src: str, original: bytes, icmp_type: int, code: int, rest: int) -> bytes:
    src_b = ipaddress.IPv6Address(src).packed
    dst_b = original[8:24]
    body = struct.pack("!BBHI", icmp_type, code, 0, rest) + original[:ICMPV6_MAX_QUOTE]
    pseudo = src_b + dst_b + struct.pack("!I3xB", len(body), ICMPV6_NEXT_HEADER)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    hdr = struct.pack("!IHBB", 6 << 28, len(body), ICMPV6_NEXT_HEADER, DEFAULT_TTL) + src_b + dst_b
    return hdr + body


def is_dont_fragment(packet: bytes) -> bool:
    """IPv6 never fragments in flight; IPv4 only when DF is set."""
    if packet[0] >> 4 == 6:
        return True
    (frag,) = struct.unpack_from("!H", packet, 6)
    return bool(frag & IPV4_DF)


def _is_multicast(packet: bytes) -> bool:
    """RFC 1122 3.2.2 / RFC 4443 2.4(e): no ICMP errors about packets sent to a multicast address."""
    if packet[0] >> 4 == 4:
        return packet[16] >> 4 == 0xE or packet[16:20] == b"\xff\xff\xff\xff"
    return packet[24] == 0xFF


def _is_icmp_error(packet: bytes) -> bool:
    """RFC 1122 3.2.2 / RFC 4443 2.4(e): never answer an ICMP error with another one."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        return packet[9] == ICMP_PROTO and len(packet) > ihl and packet[ihl] in (3, 4, 5, 11, 12)
    return packet[6] == ICMPV6_NEXT_HEADER and len(packet) > 40 and packet[40] < 128


def packet_too_big(packet: bytes, mtu: int, src_v4: str | None, src_v6: str | None) -> bytes | None:
    """Frag-needed (v4, RFC 1191 next-hop MTU) or packet-too-big (v6) for `packet`; None if not answerable."""
    return _error(
        packet, src_v4, src_v6, (ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED), (ICMPV6_PACKET_TOO_BIG, 0), mtu
    )


def answerable(codes: np.ndarray) -> np.ndarray:
    """Rows whose DropReason a router answers: too big for the tunnel, no route, TTL run out."""
    return np.isin(codes, (DropReason.OVER_MTU, DropReason.UNKNOWN_PEER, DropReason.TTL_EXCEEDED))


def answer(packet: bytes, code: int, cfg: EngineConfig) -> bytes | None:
    """The ICMP error for `packet`, dropped for `code` (an answerable one); None when none is due (a packet
    too big without DF, a multicast or ICMP error packet, no source address for its family)."""
    src4, src6 = cfg.icmp_src_v4, cfg.icmp_src_v6
    if code == DropReason.OVER_MTU:
        return packet_too_big(packet, cfg.mtu, src4, src6) if is_dont_fragment(packet) else None
    if code == DropReason.UNKNOWN_PEER:
        return net_unreachable(packet, src4, src6)
    return time_exceeded(packet, src4, src6)


def net_unreachable(packet: bytes, src_v4: str | None, src_v6: str | None) -> bytes | None:
    return _error(packet, src_v4, src_v6, (ICMP_DEST_UNREACH, ICMP_NET_UNREACH), (ICMPV6_DEST_UNREACH, 0), 0)


def time_exceeded(packet: bytes, src_v4: str | None, src_v6: str | None) -> bytes | None:
    return _error(packet, src_v4, src_v6, (ICMP_TIME_EXCEEDED, 0), (ICMPV6_TIME_EXCEEDED, 0), 0)


def _error(
    packet: bytes,
    src_v4: str | None,
    src_v6: str | None,
    v4: tuple[int, int],
    v6: tuple[int, int],
    mtu: int,
) -> bytes | None:
    if len(packet) < 20 or (packet[0] >> 4 == 6 and len(packet) < 40) or _is_multicast(packet):
        return None
    version = packet[0] >> 4
    if version == 4 and src_v4 and not _is_icmp_error(packet):
        return _icmpv4(src_v4, packet, v4[0], v4[1], mtu & 0xFFFF)
    if version == 6 and src_v6 and not _is_icmp_error(packet):
        return _icmpv6(src_v6, packet, v6[0], v6[1], mtu)
    return None
