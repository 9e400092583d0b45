"""GSO in userspace: split one TUN superpacket (TCP v4/v6 or UDP_L4) into wire-sized packets, as a batch.

Follows the kernel's tcp_gso_segment / __udp_gso_segment (spec/fastpath.md "split"): every segment gets a
copy of the IP and L4 headers, then per-row patches (IPv4 id += i, lengths, TCP seq, FIN/PSH only on the
last segment, CWR only on the first) and full checksums, all as array operations over the whole batch.
A packet without GSO comes back as a batch of one, its partial checksum finished if NEEDS_CSUM is set.
Input is never trusted: anything inconsistent gives an empty batch whose `drop` says why."""

from __future__ import annotations

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import TAILROOM, PacketBatch, round_up
from udpflannel.packet.checksum import (
    finish,
    finish_udp,
    fold,
    inet_sum,
    inet_sum_rows,
    pseudo_sum_v4,
    pseudo_sum_v6,
)
from udpflannel.packet.drops import DropReason
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VnetHdr,
)

# A superpacket is at most 64 KiB; with a tiny gso_size it could become thousands of rows. Refuse those.
MAX_SEGMENTS = 1024

_U64 = np.uint64
BytesLike = bytes | bytearray | memoryview | np.ndarray


def _as_u8(data: BytesLike) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, np.uint8)


def _be16(col: np.ndarray) -> np.ndarray:
    """A [n, 2] uint8 column pair as a writable big-endian uint16 view of shape [n]."""
    return col.view(">u2")[:, 0]


def split_superpacket(data: BytesLike, vnet_hdr: VnetHdr | BytesLike | None, headroom: int) -> PacketBatch:
    """Split `data` (an IP packet as read from TUN, without its virtio header) into a batch of packets."""
    pkt = _as_u8(data)
    if vnet_hdr is None:
        hdr = VnetHdr()
    elif isinstance(vnet_hdr, VnetHdr):
        hdr = vnet_hdr
    elif len(vnet_hdr) < 10:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    else:
        hdr = VnetHdr.decode(bytes(vnet_hdr[:10]))
    kind = hdr.gso_kind
    if len(pkt) == 0:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    if kind == VIRTIO_NET_HDR_GSO_NONE:
        return _single(pkt, hdr, headroom)
    if kind in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6):
        return _split(pkt, hdr, headroom, tcp=True)
    if kind == VIRTIO_NET_HDR_GSO_UDP_L4:
        return _split(pkt, hdr, headroom, tcp=False)
    return PacketBatch.refused(DropReason.UNSUPPORTED_GSO, headroom)


def _single(pkt: np.ndarray, hdr: VnetHdr, headroom: int) -> PacketBatch:
    """One packet, copied into a batch of one; a partial checksum (NEEDS_CSUM) is finished in place."""
    n = len(pkt)
    batch = PacketBatch(
        np.empty((1, round_up(headroom + n + TAILROOM, 8)), np.uint8), np.array([n], np.int32), headroom, 1
    )
    row = batch.buf[0, headroom : headroom + n]
    row[:] = pkt
    if hdr.needs_csum:
        start, field = hdr.csum_start, hdr.csum_start + hdr.csum_offset
        if field + 2 > n or hdr.csum_offset not in (h.TCP_CSUM, h.UDP_CSUM):
            return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
        # The field already holds the pseudo-header sum: the sum over [csum_start, end) includes it.
        s = np.array([inet_sum(row[start:])], _U64)
        c = finish_udp(s) if hdr.csum_offset == h.UDP_CSUM else finish(s)
        row[field : field + 2] = np.array([c[0]], ">u2").view(np.uint8)
    return batch


def _split(pkt: np.ndarray, hdr: VnetHdr, headroom: int, *, tcp: bool) -> PacketBatch:
    total = len(pkt)
    l3 = hdr.csum_start  # where L4 starts; hdr_len is not trusted (spec/fastpath.md), csum_start is checked
    version = int(pkt[0]) >> 4
    v4 = version == 4
    if tcp and (hdr.gso_kind == VIRTIO_NET_HDR_GSO_TCPV4) != v4:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    if v4:
        if l3 != (int(pkt[0]) & 0xF) * 4 or l3 < h.IPV4_MIN_HLEN or total < l3:
            return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
        proto = int(pkt[h.IPV4_PROTO])
    elif version == 6:
        if l3 < h.IPV6_HLEN or total < l3:
            return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
        # Extension headers between the fixed header and L4 are copied as they are; only the common case
        # (none) lets us check the protocol here.
        proto = int(pkt[h.IPV6_NEXT_HDR]) if l3 == h.IPV6_HLEN else (h.IPPROTO_TCP if tcp else h.IPPROTO_UDP)
    else:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    want_proto, want_off = (h.IPPROTO_TCP, h.TCP_CSUM) if tcp else (h.IPPROTO_UDP, h.UDP_CSUM)
    if proto != want_proto or hdr.csum_offset != want_off:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    if tcp:
        if total < l3 + h.TCP_MIN_HLEN:
            return PacketBatch.refused(DropReason.TRUNCATED, headroom)
        l4_len = (int(pkt[l3 + h.TCP_DOFF]) >> 4) * 4
        if l4_len < h.TCP_MIN_HLEN:
            return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    else:
        l4_len = h.UDP_HLEN
    hlen = l3 + l4_len
    mss = hdr.gso_size
    payload = total - hlen
    if payload < 0:
        return PacketBatch.refused(DropReason.TRUNCATED, headroom)
    if mss == 0:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    k = max(1, -(-payload // mss))
    if k > MAX_SEGMENTS:
        return PacketBatch.refused(DropReason.TOO_BIG, headroom)

    batch = _replicate(pkt, hlen, mss, payload, k, headroom)
    _patch_ip(batch, pkt, l3, v4)
    ar = np.arange(k, dtype=np.int64)
    c4 = headroom + l3
    if tcp:
        seq0 = int.from_bytes(pkt[l3 + h.TCP_SEQ : l3 + h.TCP_SEQ + 4].tobytes(), "big")
        batch.buf[:, c4 + h.TCP_SEQ : c4 + h.TCP_SEQ + 4].view(">u4")[:, 0] = (seq0 + mss * ar) & 0xFFFFFFFF
        flags = batch.buf[:, c4 + h.TCP_FLAGS]
        flags[:-1] &= ~np.uint8(h.TCP_FIN | h.TCP_PSH)
        flags[1:] &= ~np.uint8(h.TCP_CWR)
    else:
        _be16(batch.buf[:, c4 + h.UDP_LEN : c4 + h.UDP_LEN + 2])[:] = batch.lengths - l3
    _fill_l4_checksum(batch, l3, v4, proto, tcp)
    return batch


def _replicate(pkt: np.ndarray, hlen: int, mss: int, payload: int, k: int, headroom: int) -> PacketBatch:
    """k rows, each a copy of the headers followed by its slice of the payload."""
    stride = round_up(headroom + hlen + mss + TAILROOM, 8)
    buf = np.empty((k, stride), np.uint8)
    buf[:, headroom : headroom + hlen] = pkt[:hlen]
    full = k - 1
    p0 = headroom + hlen
    if full:
        buf[:full, p0 : p0 + mss] = pkt[hlen : hlen + full * mss].reshape(full, mss)
    last = payload - full * mss
    buf[full, p0 : p0 + last] = pkt[hlen + full * mss :]
    lengths = np.full(k, hlen + mss, np.int32)
    lengths[-1] = hlen + last
    return PacketBatch(buf, lengths, headroom, k)


def _patch_ip(batch: PacketBatch, pkt: np.ndarray, l3: int, v4: bool) -> None:
    """Per-row IP lengths, and for IPv4 the id (+i) and the header checksum."""
    c, buf = batch.offset, batch.buf
    if not v4:
        _be16(buf[:, c + h.IPV6_PAYLOAD_LEN : c + h.IPV6_PAYLOAD_LEN + 2])[:] = batch.lengths - h.IPV6_HLEN
        return
    ids = (int.from_bytes(pkt[h.IPV4_ID : h.IPV4_ID + 2].tobytes(), "big") + np.arange(batch.n)) & 0xFFFF
    _be16(buf[:, c + h.IPV4_TOTAL_LEN : c + h.IPV4_TOTAL_LEN + 2])[:] = batch.lengths
    _be16(buf[:, c + h.IPV4_ID : c + h.IPV4_ID + 2])[:] = ids
    # Only length and id differ per row: sum the rest once, then add them per row.
    base = np.array(pkt[:l3])
    base[h.IPV4_TOTAL_LEN : h.IPV4_TOTAL_LEN + 2] = 0
    base[h.IPV4_ID : h.IPV4_ID + 2] = 0
    base[h.IPV4_CSUM : h.IPV4_CSUM + 2] = 0
    s = _U64(inet_sum(base)) + batch.lengths.astype(_U64) + ids.astype(_U64)
    _be16(buf[:, c + h.IPV4_CSUM : c + h.IPV4_CSUM + 2])[:] = finish(s)


def _fill_l4_checksum(batch: PacketBatch, l3: int, v4: bool, proto: int, tcp: bool) -> None:
    c, buf = batch.offset, batch.buf
    col = c + l3 + (h.TCP_CSUM if tcp else h.UDP_CSUM)
    buf[:, col : col + 2] = 0
    l4len = batch.lengths - l3
    if v4:
        src, dst = buf[:1, c + h.IPV4_SRC : c + h.IPV4_SRC + 4], buf[:1, c + h.IPV4_DST : c + h.IPV4_DST + 4]
        pseudo = pseudo_sum_v4(src, dst, proto, l4len)
    else:
        src, dst = (
            buf[:1, c + h.IPV6_SRC : c + h.IPV6_SRC + 16],
            buf[:1, c + h.IPV6_DST : c + h.IPV6_DST + 16],
        )
        pseudo = pseudo_sum_v6(src, dst, proto, l4len)
    s = fold(pseudo + inet_sum_rows(buf[:, c + l3 :], l4len))
    _be16(buf[:, col : col + 2])[:] = finish(s) if tcp else finish_udp(s)
