"""UDP datagrams of one flow as one USO superpacket for one TUN write (Linux 6.2+ cuts it back into the very
same datagrams on its way to the socket): a packet-rate flow (DNS, QUIC, iperf3 -u) then costs one write per
receive instead of one per datagram.

Rules, as the kernel's own UDP GRO: one flow (addresses, ports), the same IP header fields (TOS or traffic
class and flow label, TTL or hop limit, DF), no IPv4 options or fragments, each UDP length matching its IP
length, equal payloads but a last one that may be shorter, at most UDP_MAX_SEGMENTS datagrams and 64 KiB.
Checksums must be verified before (the write asks the kernel to compute every datagram's anew); IPv4 ids
are the kernel's to number, as for any segmented packet."""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import M
from udpflannel.packet.gro_run import set_ip_length
from udpflannel.packet.parse import IpFields
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VNET_HDR_LEN,
    VNET_HDR_STRUCT,
)

UDP_MAX_SEGMENTS = 64  # the kernel's limit on datagrams in one UDP GSO packet (128 on newer kernels)
_H = struct.Struct("!H")


@lru_cache(maxsize=4)
def _same_words(v6: bool) -> np.ndarray:
    """16-bit words (all or nothing) of IP + UDP header that every datagram repeats from the first: all but
    the lengths, IPv4 id and checksum, and the UDP checksum."""
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    mask = np.full((l3 + h.UDP_HLEN) // 2, 0xFFFF, np.uint16)
    varying = [h.IPV6_PAYLOAD_LEN] if v6 else [h.IPV4_TOTAL_LEN, h.IPV4_ID, h.IPV4_CSUM]
    mask[[x // 2 for x in (*varying, l3 + h.UDP_LEN, l3 + h.UDP_CSUM)]] = 0
    return mask


def coalesce_udp(batch: PacketBatch, keep: np.ndarray, f: IpFields) -> memoryview | None:
    """The kept rows of `batch` (`f`: their ip_fields; checksums verified) as one write, virtio header and
    USO superpacket, when they are all UDP datagrams of one flow by the rules above; else None."""
    rows = np.flatnonzero(keep)
    k = len(rows)
    if not 2 <= k <= UDP_MAX_SEGMENTS:
        return None
    r0 = int(rows[0])
    v6 = int(f.version[r0]) == 6
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    hl = l3 + h.UDP_HLEN
    if (
        np.count_nonzero(f.proto[rows] != h.IPPROTO_UDP)
        or np.count_nonzero(f.l3len[rows] != l3)
        or np.count_nonzero(f.version[rows] != f.version[r0])
        or (not v6 and np.count_nonzero(f.is_fragment[rows]))
    ):
        return None
    lens = f.ip_len[rows]
    first, final = int(lens[0]), int(lens[-1])
    gso, last = first - hl, final - hl
    total = hl + (k - 1) * gso + last
    if gso <= 0 or not 0 < last <= gso or total - (l3 if v6 else 0) > h.IP_MAXPACKET:
        return None
    if k > 2 and np.count_nonzero(lens[1:-1] != first):
        return None
    off = batch.offset
    hdr = f.buf[rows, off : off + hl]  # a gather of k short rows
    words = hdr.view(np.uint16)
    if np.count_nonzero((words ^ words[0]) & _same_words(v6)):
        return None
    if np.count_nonzero(hdr[:, l3 + h.UDP_LEN : l3 + h.UDP_LEN + 2].view(">u2")[:, 0] != lens - l3):
        return None
    v = VNET_HDR_LEN
    dst = np.empty(v + total, np.uint8)
    dst[v : v + hl] = hdr[0]
    end = v + hl + (k - 1) * gso
    dst[v + hl : end].reshape(k - 1, gso)[:] = f.buf[rows[:-1], off + hl : off + hl + gso]
    dst[end:] = f.buf[rows[-1], off + hl : off + hl + last]
    mv = memoryview(dst)
    _finish(mv, v6=v6, l3=l3, gso=gso, total=total)
    return mv


def _finish(mv: memoryview, *, v6: bool, l3: int, gso: int, total: int) -> None:
    """The superpacket's own lengths, IPv4 header checksum, a NEEDS_CSUM UDP checksum (the folded
    pseudo-header sum with its full UDP length, from which the kernel moves to each datagram's), and the
    virtio header asking for gso-byte datagrams."""
    v = VNET_HDR_LEN
    udp_len = total - l3
    pseudo = set_ip_length(mv, v6=v6, total=total)
    _H.pack_into(mv, v + l3 + h.UDP_LEN, udp_len)
    _H.pack_into(mv, v + l3 + h.UDP_CSUM, (pseudo + h.IPPROTO_UDP + udp_len - 1) % M + 1)
    VNET_HDR_STRUCT.pack_into(
        mv, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, l3 + h.UDP_HLEN, gso, l3, h.UDP_CSUM
    )
