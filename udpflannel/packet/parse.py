"""Vectorised parsing and validation of the IP packets in a batch: header fields as arrays, drop codes.

Nothing here raises on bad bytes: every row gets a DropReason code (0 = keep), counted by the caller."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import fold, inet_sum_rows, pseudo_sum_v4, pseudo_sum_v6
from udpflannel.packet.drops import DropReason

# Columns read from every row: the IPv6 fixed header, or an IPv4 header with options.
_HEAD_COLS = h.IPV4_MAX_HLEN
_U64 = np.uint64


@dataclass
class IpFields:
    """Per-row header fields (arrays of length n). Values in rows that fail validation are meaningless."""

    version: np.ndarray  # 4, 6 or anything else
    l3len: np.ndarray  # IP header length in bytes (IPv6: 40; extension headers are not walked)
    proto: np.ndarray  # IPv4 protocol / IPv6 next header
    ip_len: np.ndarray  # packet length according to the IP header
    is_fragment: np.ndarray  # IPv4 MF set or fragment offset != 0
    head: np.ndarray  # uint8 [n, 60]: the first 60 bytes of every row (zero beyond the packet)


def _head(batch: PacketBatch) -> np.ndarray:
    off, n = batch.offset, batch.n
    cols = min(_HEAD_COLS, batch.stride - off)
    out = np.zeros((n, _HEAD_COLS), np.uint8)
    out[:, :cols] = batch.buf[:n, off : off + cols]
    out[np.arange(_HEAD_COLS) >= batch.lengths[:, None]] = 0
    return out


def ip_fields(batch: PacketBatch) -> IpFields:
    head = _head(batch)
    version = head[:, 0] >> 4
    v4 = version == 4
    ihl = (head[:, 0] & 0xF).astype(np.int32) * 4
    be16 = head.view(">u2").astype(np.int32)  # be16[:, k] is the 16-bit word at byte 2k
    l3len = np.where(v4, ihl, h.IPV6_HLEN).astype(np.int32)
    proto = np.where(v4, head[:, h.IPV4_PROTO], head[:, h.IPV6_NEXT_HDR])
    ip_len = np.where(v4, be16[:, h.IPV4_TOTAL_LEN // 2], be16[:, h.IPV6_PAYLOAD_LEN // 2] + h.IPV6_HLEN)
    frag = v4 & ((be16[:, h.IPV4_FRAG // 2] & h.IPV4_MF_OFFSET_MASK) != 0)
    return IpFields(version, l3len, proto, ip_len.astype(np.int32), frag, head)


def validate_ip(
    batch: PacketBatch, *, trim: bool = True, l4_checksum: bool = False, fields: IpFields | None = None
) -> np.ndarray:
    """Drop reason codes (uint8 [n], 0 = keep) for every row of the batch.

    With trim, rows longer than their IP length (link padding) are shortened in batch.lengths. With
    l4_checksum, TCP and UDP checksums of unfragmented rows are verified as well (BAD_L4_CHECKSUM)."""
    f = fields or ip_fields(batch)
    n = batch.n
    length = batch.lengths[:n].astype(np.int32)
    v4, v6 = f.version == 4, f.version == 6
    hsum = inet_sum_rows(f.head, np.where(v4 | v6, np.minimum(f.l3len, length), 0))
    codes = np.select(
        [
            length < 1,
            ~(v4 | v6),
            v4 & (length < h.IPV4_MIN_HLEN),
            v4 & (f.l3len < h.IPV4_MIN_HLEN),
            v4 & (f.l3len > length),
            v4 & (f.ip_len < f.l3len),
            v6 & (length < h.IPV6_HLEN),
            f.ip_len > length,
            v4 & (hsum != 0xFFFF),
        ],
        [
            DropReason.TRUNCATED,
            DropReason.BAD_HEADER,
            DropReason.TRUNCATED,
            DropReason.BAD_HEADER,
            DropReason.TRUNCATED,
            DropReason.BAD_HEADER,
            DropReason.TRUNCATED,
            DropReason.TRUNCATED,
            DropReason.BAD_IP_CHECKSUM,
        ],
        DropReason.NONE,
    ).astype(np.uint8)
    ok = codes == 0
    if trim:
        shorter = ok & (f.ip_len < length)
        batch.lengths[:n][shorter] = f.ip_len[shorter]
    if l4_checksum:
        bad = ok & ~l4_checksum_ok(batch, f, hsum)
        codes[bad] = DropReason.BAD_L4_CHECKSUM
    return codes


def l4_checksum_ok(batch: PacketBatch, f: IpFields, hsum: np.ndarray | None = None) -> np.ndarray:
    """True for rows whose TCP/UDP checksum verifies, and for rows it does not apply to (other protocols,
    fragments, IPv4 UDP without checksum). Rows must already have passed the IP checks."""
    n, off = batch.n, batch.offset
    v4 = f.version == 4
    l4 = ((f.proto == h.IPPROTO_TCP) | (f.proto == h.IPPROTO_UDP)) & ~f.is_fragment & (f.ip_len > f.l3len)
    if not l4.any():
        return np.ones(n, bool)
    if hsum is None:
        hsum = inet_sum_rows(f.head, f.l3len)
    ip_len = np.minimum(f.ip_len, batch.lengths[:n])
    l4len = np.maximum(ip_len - f.l3len, 0)
    # The row sum from the IP header on, minus the IP header's own sum, is the L4 sum (one's complement:
    # subtracting x is adding ~x), whatever the header length.
    total = inet_sum_rows(batch.buf[:n, off:], np.where(l4, ip_len, 0))
    body = fold(total + (_U64(0xFFFF) - hsum))
    p4 = pseudo_sum_v4(
        f.head[:, h.IPV4_SRC : h.IPV4_SRC + 4], f.head[:, h.IPV4_DST : h.IPV4_DST + 4], f.proto, l4len
    )
    p6 = pseudo_sum_v6(
        f.head[:, h.IPV6_SRC : h.IPV6_SRC + 16], f.head[:, h.IPV6_DST : h.IPV6_DST + 16], f.proto, l4len
    )
    s = fold(np.where(v4, p4, p6) + body)
    ok = (s % _U64(0xFFFF)) == 0
    # IPv4 UDP checksum 0 means "not computed" (RFC 768); IPv6 forbids it (RFC 8200 section 8.1).
    l4col = f.l3len + h.UDP_CSUM
    rows = np.arange(n)
    udp_zero = np.zeros(n, bool)
    is_udp4 = l4 & v4 & (f.proto == h.IPPROTO_UDP) & (f.ip_len >= f.l3len + h.UDP_HLEN)
    if is_udp4.any():
        cols = np.minimum(l4col, batch.stride - off - 2)
        word = batch.buf[rows, off + cols].astype(np.int32) << 8 | batch.buf[rows, off + cols + 1]
        udp_zero = is_udp4 & (word == 0)
    return ~l4 | ok | udp_zero
