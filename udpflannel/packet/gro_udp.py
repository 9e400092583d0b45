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
from udpflannel.packet.parse import IpFields, validate_one
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


@lru_cache(maxsize=8)
def _run_mask(prefix: int, v6: bool) -> np.ndarray:
    """16-bit words of prefix + IP + UDP header that every row but the last repeats from row 0 in a
    udp_run: all (lengths too: those rows are equally long) but IPv4's id and checksum, UDP's checksum."""
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    mask = np.full((prefix + l3 + h.UDP_HLEN) // 2, 0xFFFF, np.uint16)
    ip = prefix // 2
    varying = [h.UDP_CSUM + l3] if v6 else [h.IPV4_ID, h.IPV4_CSUM, h.UDP_CSUM + l3]
    mask[[ip + x // 2 for x in varying]] = 0
    return mask


def _same_flow(a: bytes, b: bytes, v6: bool) -> bool:
    """IP + UDP headers a and b (row 0 and the last row of a run) alike but for lengths, id and checksums."""
    if v6:  # version, class, flow label; next header, hop limit, addresses, ports
        return a[:4] == b[:4] and a[6:44] == b[6:44]
    l3 = h.IPV4_MIN_HLEN  # version, TOS; flags and offset, TTL, protocol; addresses, ports
    return a[:2] == b[:2] and a[6:10] == b[6:10] and a[12 : l3 + 4] == b[12 : l3 + 4]


def udp_run(batch: PacketBatch, prefix: int = 0) -> memoryview | None:
    """A receive train as one write (virtio header + USO superpacket) when its rows are one UDP flow's
    datagrams by the rules above, with sound IP headers and every UDP checksum right; else None. Each row
    holds `prefix` bytes (VXLAN and inner Ethernet headers, which the caller judged in row 0; every row
    must repeat them) and then its IP packet. The counterpart of gro_run.coalesce_run for a packet-rate
    flow: ~20 array operations, where validate_ip and coalesce_udp took ~60 for the same rows."""
    n, off = batch.n, batch.offset
    if not 2 <= n <= UDP_MAX_SEGMENTS or prefix & 1:
        return None
    buf, lens = batch.buf, batch.lengths
    inner = off + prefix
    first, final = int(lens[0]) - prefix, int(lens[n - 1]) - prefix
    if first <= h.IPV4_MIN_HLEN + h.UDP_HLEN or buf.shape[1] < inner + first:
        return None
    p0 = buf[0, inner : inner + min(first, h.IPV6_HLEN + h.UDP_HLEN)].tobytes()
    v6 = p0[0] >> 4 == 6
    if v6:
        if first <= h.IPV6_HLEN + h.UDP_HLEN or p0[h.IPV6_NEXT_HDR] != h.IPPROTO_UDP:
            return None
        l3, ip_len = h.IPV6_HLEN, int.from_bytes(p0[4:6], "big") + h.IPV6_HLEN
    else:
        l3, ip_len = h.IPV4_MIN_HLEN, int.from_bytes(p0[2:4], "big")
        frag = int.from_bytes(p0[h.IPV4_FRAG : h.IPV4_FRAG + 2], "big")
        if p0[0] != 0x45 or p0[h.IPV4_PROTO] != h.IPPROTO_UDP or frag & h.IPV4_MF_OFFSET_MASK:
            return None
    hl = l3 + h.UDP_HLEN
    gso, last = first - hl, final - hl
    total = hl + (n - 1) * gso + last
    if (
        ip_len != first
        or int.from_bytes(p0[l3 + h.UDP_LEN : l3 + h.UDP_LEN + 2], "big") != first - l3
        or gso <= 0
        or not 0 < last <= gso
        or total - (l3 if v6 else 0) > h.IP_MAXPACKET
    ):
        return None
    if n > 2 and lens[1 : n - 1].tobytes() != lens[: n - 2].tobytes():  # each the same as the one before
        return None
    # The last row, in plain Python: sound on its own (validate_one) and of the same flow.
    pn = buf[n - 1].data[off : inner + final]
    code, length = validate_one(pn[prefix:])
    if code or length != final or pn[prefix + l3 + h.UDP_CSUM : prefix + hl] == b"\0\0":
        return None
    if pn[:prefix] != buf[0].data[off:inner] or not _same_flow(p0, bytes(pn[prefix : prefix + hl]), v6):
        return None
    # Rows 0..n-2: row 0's words where the mask looks (native order: the mask reads the same either way).
    full = buf[: n - 1]
    words = full[:, off : inner + hl].view(np.uint16)
    if np.count_nonzero((words ^ words[0]) & _run_mask(prefix, v6)):
        return None
    # Their checksums: IPv4 headers sum to 0 (mod 0xFFFF); UDP over the pseudo-header too, as little-endian
    # words (a byte swap is a factor 256 mod 0xFFFF), none of them 0 ("not computed": the general path).
    if not v6 and np.count_nonzero(
        full[:, inner : inner + l3].view(np.uint16).sum(axis=1, dtype=np.uint32) % M
    ):
        return None
    seg = first - l3
    even = seg & ~1
    sums = full[:, inner + l3 : inner + l3 + even].view(np.uint16).sum(axis=1, dtype=np.uint32)
    if seg & 1:
        sums += full[:, inner + l3 + even]
    addrs = p0[8:40] if v6 else p0[12:20]
    sums += (int.from_bytes(addrs, "big") + h.IPPROTO_UDP + seg) % M * 256
    at = inner + l3 + h.UDP_CSUM
    if np.count_nonzero(sums % M) or not full[:, at : at + 2].view(np.uint16).all():
        return None
    v = VNET_HDR_LEN
    dst = np.empty(v + total, np.uint8)
    dst[v : v + hl] = buf[0, inner : inner + hl]
    end = v + hl + (n - 1) * gso
    dst[v + hl : end].reshape(n - 1, gso)[:] = full[:, inner + hl : inner + first]
    dst[end:] = buf[n - 1, inner + hl : inner + final]
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
