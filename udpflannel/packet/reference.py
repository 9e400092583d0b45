"""Per-packet twins of the batch functions, in plain Python: one segment at a time, bytes in, bytes out.

They are the readable statement of what gso.py and gro.py compute, the oracle their tests compare bytes
against, and the baseline perf/micro.py measures. Not used on the datapath."""

from __future__ import annotations

import struct

from udpflannel.packet import headers as h
from udpflannel.packet.drops import DropReason
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VnetHdr,
)


def checksum(data: bytes | bytearray, initial: int = 0) -> int:
    """RFC 1071 Internet checksum of data, starting from a (pseudo-header) sum."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ones_sum(data: bytes | bytearray) -> int:
    """Folded one's-complement sum (not complemented)."""
    return ~checksum(data) & 0xFFFF


def pseudo_header(pkt: bytes | bytearray, proto: int, l4len: int) -> int:
    if pkt[0] >> 4 == 4:
        raw = bytes(pkt[h.IPV4_SRC : h.IPV4_DST + 4]) + struct.pack("!BBH", 0, proto, l4len)
    else:
        raw = bytes(pkt[h.IPV6_SRC : h.IPV6_DST + 16]) + struct.pack("!IxxxB", l4len, proto)
    return ones_sum(raw)


def split(pkt: bytes, vh: VnetHdr) -> list[bytes]:
    """What split_superpacket returns, one packet at a time (valid input only)."""
    kind = vh.gso_kind
    if kind == VIRTIO_NET_HDR_GSO_NONE:
        out = bytearray(pkt)
        if vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            field = vh.csum_start + vh.csum_offset
            c = checksum(out[vh.csum_start :])
            if vh.csum_offset == h.UDP_CSUM and c == 0:
                c = 0xFFFF
            out[field : field + 2] = struct.pack("!H", c)
        return [bytes(out)]
    tcp = kind in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6)
    assert tcp or kind == VIRTIO_NET_HDR_GSO_UDP_L4
    l3 = vh.csum_start
    v4 = pkt[0] >> 4 == 4
    hlen = l3 + ((pkt[l3 + h.TCP_DOFF] >> 4) * 4 if tcp else h.UDP_HLEN)
    payload = pkt[hlen:]
    chunks = [payload[i : i + vh.gso_size] for i in range(0, len(payload), vh.gso_size)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        seg = bytearray(pkt[:hlen]) + chunk
        last = i == len(chunks) - 1
        if v4:
            ip_id = (struct.unpack_from("!H", pkt, h.IPV4_ID)[0] + i) & 0xFFFF
            struct.pack_into("!HH", seg, h.IPV4_TOTAL_LEN, len(seg), ip_id)
            struct.pack_into("!H", seg, h.IPV4_CSUM, 0)
            struct.pack_into("!H", seg, h.IPV4_CSUM, checksum(seg[:l3]))
        else:
            struct.pack_into("!H", seg, h.IPV6_PAYLOAD_LEN, len(seg) - h.IPV6_HLEN)
        if tcp:
            seq = (struct.unpack_from("!I", pkt, l3 + h.TCP_SEQ)[0] + i * vh.gso_size) & 0xFFFFFFFF
            struct.pack_into("!I", seg, l3 + h.TCP_SEQ, seq)
            if not last:
                seg[l3 + h.TCP_FLAGS] &= ~(h.TCP_FIN | h.TCP_PSH) & 0xFF
            if i:
                seg[l3 + h.TCP_FLAGS] &= ~h.TCP_CWR & 0xFF
            proto, col = h.IPPROTO_TCP, l3 + h.TCP_CSUM
        else:
            struct.pack_into("!H", seg, l3 + h.UDP_LEN, len(seg) - l3)
            proto, col = h.IPPROTO_UDP, l3 + h.UDP_CSUM
        struct.pack_into("!H", seg, col, 0)
        c = checksum(seg[l3:], pseudo_header(seg, proto, len(seg) - l3))
        if not tcp and c == 0:
            c = 0xFFFF
        struct.pack_into("!H", seg, col, c)
        out.append(bytes(seg))
    return out


def coalesce_run(segments: list[bytes]) -> bytes:
    """The GRO write of a run of segments the batch code decided to merge: virtio header + superpacket."""
    first = segments[0]
    v4 = first[0] >> 4 == 4
    l3 = (first[0] & 0xF) * 4 if v4 else h.IPV6_HLEN
    hlen = l3 + (first[l3 + h.TCP_DOFF] >> 4) * 4
    out = bytearray(first) + b"".join(s[hlen:] for s in segments[1:])
    if v4:
        struct.pack_into("!H", out, h.IPV4_TOTAL_LEN, len(out))
        struct.pack_into("!H", out, h.IPV4_CSUM, 0)
        struct.pack_into("!H", out, h.IPV4_CSUM, checksum(out[:l3]))
    else:
        struct.pack_into("!H", out, h.IPV6_PAYLOAD_LEN, len(out) - h.IPV6_HLEN)
    out[l3 + h.TCP_FLAGS] = segments[-1][l3 + h.TCP_FLAGS]
    struct.pack_into("!H", out, l3 + h.TCP_CSUM, pseudo_header(out, h.IPPROTO_TCP, len(out) - l3))
    kind = VIRTIO_NET_HDR_GSO_TCPV4 if v4 else VIRTIO_NET_HDR_GSO_TCPV6
    gso = len(first) - hlen
    vh = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, hlen, gso, l3, h.TCP_CSUM)
    return vh.encode() + bytes(out)


def validate(pkt: bytes, l4_checksum: bool = True) -> tuple[int, int]:
    """What validate_ip says about one packet: (DropReason value, length after trimming link padding)."""
    n = len(pkt)
    if n == 0:
        return DropReason.TRUNCATED, n
    version = pkt[0] >> 4
    if version not in (4, 6):
        return DropReason.BAD_HEADER, n
    if version == 4:
        l3 = (pkt[0] & 0xF) * 4
        if l3 < h.IPV4_MIN_HLEN:
            return DropReason.BAD_HEADER, n
        if n < l3:
            return DropReason.TRUNCATED, n
        ip_len = struct.unpack_from("!H", pkt, h.IPV4_TOTAL_LEN)[0]
        proto = pkt[h.IPV4_PROTO]
        fragment = struct.unpack_from("!H", pkt, h.IPV4_FRAG)[0] & h.IPV4_MF_OFFSET_MASK != 0
    else:
        if n < h.IPV6_HLEN:
            return DropReason.TRUNCATED, n
        l3 = h.IPV6_HLEN
        ip_len = struct.unpack_from("!H", pkt, h.IPV6_PAYLOAD_LEN)[0] + h.IPV6_HLEN
        proto = pkt[h.IPV6_NEXT_HDR]
        fragment = False
    if ip_len > n:
        return DropReason.TRUNCATED, n
    if version == 4 and ip_len < l3:
        return DropReason.BAD_HEADER, n
    if version == 4 and checksum(pkt[:l3]) != 0:
        return DropReason.BAD_IP_CHECKSUM, n
    if l4_checksum and proto in (h.IPPROTO_TCP, h.IPPROTO_UDP) and not fragment and ip_len > l3:
        l4 = pkt[l3:ip_len]
        col = h.TCP_CSUM if proto == h.IPPROTO_TCP else h.UDP_CSUM
        field = l4[col : col + 2] if len(l4) >= col + 2 else None
        if proto == h.IPPROTO_UDP and field == b"\0\0":
            if version == 6:  # RFC 8200 section 8.1: a zero UDP checksum is not allowed
                return DropReason.BAD_L4_CHECKSUM, ip_len
        elif checksum(l4, pseudo_header(pkt, proto, len(l4))) not in (0, 0xFFFF):
            return DropReason.BAD_L4_CHECKSUM, ip_len
    return DropReason.NONE, ip_len
