"""Vectorised parsing and validation of the IP packets in a batch: header fields as arrays, drop codes.

Nothing here raises on bad bytes: every row gets a DropReason code (0 = keep), counted by the caller.
Fields are read through one fixed-column word view of each row's first 40 bytes; a row too short for a
field reads bytes past its end, which is harmless because the length checks reject such rows. A batch of
plain IPv4 rows (the usual case: one flow's segments) takes a shorter path with the same results."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import M, sum_rows_raw
from udpflannel.packet.drops import DropReason

# Every row must have this many readable columns after the offset (the longest IPv4 and TCP headers).
_WIDTH = h.IPV4_MAX_HLEN + h.TCP_MAX_HLEN
_W = 2  # bytes per word of IpFields.words


@dataclass
class IpFields:
    """Per-row header fields (arrays of length n). Values in rows that fail validation are meaningless."""

    buf: np.ndarray  # the batch buffer, or a widened copy of it (see readable())
    offset: int  # where each packet starts in its row
    words: np.ndarray  # big-endian uint16 [n, 20]: the first 40 bytes of every row
    version: np.ndarray  # 4, 6 or anything else
    l3len: np.ndarray  # IP header length in bytes (IPv6: 40; extension headers are not walked)
    proto: np.ndarray  # IPv4 protocol / IPv6 next header
    ip_len: np.ndarray  # packet length according to the IP header
    is_fragment: np.ndarray  # IPv4 MF set or fragment offset != 0
    plain_v4: bool  # every row starts 0x45: IPv4 without options


def readable(batch: PacketBatch) -> np.ndarray:
    """The batch buffer if every row has _WIDTH columns after the offset, else a zero-padded copy."""
    n, off = batch.n, batch.offset
    if batch.stride >= off + _WIDTH and batch.buf.flags.c_contiguous:
        return batch.buf[:n]
    wide = np.zeros((n, off + _WIDTH + batch.stride), np.uint8)
    wide[:, : batch.stride] = batch.buf[:n]
    return wide


def ip_fields(batch: PacketBatch) -> IpFields:
    buf = readable(batch)
    off = batch.offset
    n = batch.n
    words = buf[:, off : off + 40].view(">u2")
    b0 = buf[:, off]
    if (b0 == 0x45).all():
        # Plain IPv4 rows: the columns are views, computed only where something reads them.
        w = words.astype(np.int32)
        proto = w[:, h.IPV4_PROTO // _W] & 0xFF
        frag = (w[:, h.IPV4_FRAG // _W] & h.IPV4_MF_OFFSET_MASK) != 0
        return IpFields(buf, off, words, np.full(n, 4), np.full(n, 20), proto, w[:, 1], frag, True)
    version = b0 >> 4
    v4 = version == 4
    l3len = np.where(v4, (b0 & 0xF).astype(np.int32) * 4, h.IPV6_HLEN)
    proto = np.where(v4, words[:, h.IPV4_PROTO // _W] & 0xFF, words[:, h.IPV6_NEXT_HDR // _W] >> 8)
    ip_len = np.where(v4, words[:, h.IPV4_TOTAL_LEN // _W], words[:, h.IPV6_PAYLOAD_LEN // _W] + h.IPV6_HLEN)
    frag = v4 & ((words[:, h.IPV4_FRAG // _W] & h.IPV4_MF_OFFSET_MASK) != 0)
    return IpFields(buf, off, words, version, l3len, proto, ip_len.astype(np.int32), frag, False)


def validate_ip(
    batch: PacketBatch, *, trim: bool = True, l4_checksum: bool = False, fields: IpFields | None = None
) -> np.ndarray:
    """Drop reason codes (uint8 [n], 0 = keep) for every row of the batch.

    With trim, rows longer than their IP length (link padding) are shortened in batch.lengths. With
    l4_checksum, TCP and UDP checksums of unfragmented rows are verified as well (BAD_L4_CHECKSUM)."""
    f = fields or ip_fields(batch)
    n = batch.n
    length = batch.lengths[:n]
    hsum = f.words[:, :10].sum(axis=1, dtype=np.int64)  # the 20-byte IPv4 header; IPv4 options below
    if f.plain_v4 and not ((length < 20) | (f.ip_len < 20) | (f.ip_len > length) | (hsum % M != 0)).any():
        codes = np.zeros(n, np.uint8)  # the common case: every row is a sound IPv4 packet
        if l4_checksum and _all_tcp4_checked(batch, f, codes):
            return codes
    else:
        codes = _codes(f, length, hsum)
    ok = codes == 0
    if trim:
        shorter = ok & (f.ip_len < length)
        if shorter.any():
            batch.lengths[:n][shorter] = f.ip_len[shorter]
    if l4_checksum:
        codes[ok & ~l4_checksum_ok(batch, f, ok)] = DropReason.BAD_L4_CHECKSUM
    return codes


def _all_tcp4_checked(batch: PacketBatch, f: IpFields, codes: np.ndarray) -> bool:
    """For sound plain-IPv4 rows that are all unfragmented TCP with payload or header (a train): verify
    every TCP checksum in one pass, marking failures in `codes`. False if the batch is not such a train
    (then the general check runs). Rows are not trimmed here: their IP length equals their length."""
    if not (f.proto == h.IPPROTO_TCP).all() or f.is_fragment.any() or not (f.ip_len == batch.lengths).all():
        return False
    pseudo = f.words[:, h.IPV4_SRC // _W : (h.IPV4_DST + 4) // _W].sum(axis=1, dtype=np.int64)
    s = sum_rows_raw(f.buf[:, f.offset :], f.ip_len) + pseudo + f.ip_len + (h.IPPROTO_TCP - h.IPV4_MIN_HLEN)
    bad = s % M != 0
    if bad.any():
        codes[bad] = DropReason.BAD_L4_CHECKSUM
    return True


def _codes(f: IpFields, length: np.ndarray, hsum: np.ndarray) -> np.ndarray:
    v4, v6 = f.version == 4, f.version == 6
    longer = v4 & (f.l3len > h.IPV4_MIN_HLEN)
    if longer.any():
        off = f.offset
        full = sum_rows_raw(f.buf[:, off:], np.where(longer, np.minimum(f.l3len, h.IPV4_MAX_HLEN), 0))
        hsum = np.where(longer, full, hsum)
    # RFC 791: a correct header sums to 0xFFFF, i.e. to 0 mod 0xFFFF (and is not all zeros)
    csum_ok = (hsum % M == 0) & (hsum > 0)
    minimum = np.where(v4, np.maximum(f.l3len, h.IPV4_MIN_HLEN), h.IPV6_HLEN)
    return np.select(
        [
            ~(v4 | v6) & (length > 0),
            v4 & (f.l3len < h.IPV4_MIN_HLEN),
            (length < minimum) | (f.ip_len > length),
            v4 & (f.ip_len < f.l3len),
            v4 & ~csum_ok,
        ],
        [
            DropReason.BAD_HEADER,
            DropReason.BAD_HEADER,
            DropReason.TRUNCATED,
            DropReason.BAD_HEADER,
            DropReason.BAD_IP_CHECKSUM,
        ],
        DropReason.NONE,
    ).astype(np.uint8)


def l4_checksum_ok(batch: PacketBatch, f: IpFields, ok: np.ndarray | None = None) -> np.ndarray:
    """True for rows whose TCP/UDP checksum verifies, and for rows it does not apply to (other protocols,
    fragments, IPv4 UDP without checksum). Judges only rows that passed the IP checks (`ok`)."""
    n, off = batch.n, batch.offset
    l4 = ((f.proto == h.IPPROTO_TCP) | (f.proto == h.IPPROTO_UDP)) & ~f.is_fragment & (f.ip_len > f.l3len)
    if ok is not None:
        l4 &= ok
    if not l4.any():
        return np.ones(n, bool)
    w = f.words.astype(np.int64)
    proto = f.proto.astype(np.int64)
    # Sum the whole packet, IP header included: a valid IPv4 header sums to 0 (mod 0xFFFF), and an IPv6
    # header holds the pseudo-header's addresses already, so only small per-row corrections remain.
    s = sum_rows_raw(f.buf[:, off:], np.where(l4, f.ip_len, 0))
    add4 = w[:, h.IPV4_SRC // _W : (h.IPV4_DST + 4) // _W].sum(axis=1) + proto + (f.ip_len - f.l3len)
    if f.plain_v4:
        s += add4
    else:
        # IPv6: drop the header words the pseudo-header lacks (version/class/flow, next header + hop limit)
        # and add the next header alone; the payload length is the upper-layer length (no extensions).
        add6 = 4 * M - w[:, 0] - w[:, 1] - w[:, h.IPV6_NEXT_HDR // _W] + proto
        s += np.where(f.version == 4, add4, add6)
    good = s % M == 0
    # UDP checksum 0 means "not computed" in IPv4 (RFC 768) and is forbidden in IPv6 (RFC 8200 section 8.1).
    udp = l4 & (f.proto == h.IPPROTO_UDP) & (f.ip_len >= f.l3len + h.UDP_HLEN)
    if udp.any():
        col = np.minimum(off + f.l3len + h.UDP_CSUM, f.buf.shape[1] - 2)
        rows = np.arange(n)
        zero = udp & (f.buf[rows, col] == 0) & (f.buf[rows, col + 1] == 0)
        v4 = f.version == 4
        good = (good | (zero & v4)) & ~(zero & ~v4)
    return ~l4 | good


def _word_sum(data: bytes | memoryview) -> int:
    """A sum congruent (mod 0xFFFF) to the one's-complement sum of data's big-endian 16-bit words: as
    2**16 is 1 mod 0xFFFF, the whole buffer read as one big-endian integer is (RFC 1071 in one C call)."""
    x = int.from_bytes(data, "big")
    return x << 8 if len(data) & 1 else x  # an odd tail byte is the high byte of a zero-padded word


def validate_one(pkt: bytes | memoryview) -> tuple[int, int]:
    """validate_ip(l4_checksum=True) for one packet, in plain Python (cheaper than ~40 array operations
    when a batch holds a few small packets, e.g. ACKs): (DropReason value, length after trimming)."""
    n = len(pkt)
    if n == 0:
        return DropReason.TRUNCATED, n
    version = pkt[0] >> 4
    if version == 4:
        l3 = (pkt[0] & 0xF) * 4
        if l3 < h.IPV4_MIN_HLEN:
            return DropReason.BAD_HEADER, n
        if n < l3:
            return DropReason.TRUNCATED, n
        ip_len = (pkt[h.IPV4_TOTAL_LEN] << 8) | pkt[h.IPV4_TOTAL_LEN + 1]
        if ip_len > n:
            return DropReason.TRUNCATED, n
        if ip_len < l3:
            return DropReason.BAD_HEADER, n
        if _word_sum(pkt[:l3]) % M:  # RFC 791: a sound header sums to 0xFFFF (it is never all zeros)
            return DropReason.BAD_IP_CHECKSUM, n
        proto = pkt[h.IPV4_PROTO]
        fragment = ((pkt[h.IPV4_FRAG] << 8) | pkt[h.IPV4_FRAG + 1]) & h.IPV4_MF_OFFSET_MASK
        pseudo = _word_sum(pkt[h.IPV4_SRC : h.IPV4_DST + 4])
    elif version == 6:
        if n < h.IPV6_HLEN:
            return DropReason.TRUNCATED, n
        l3 = h.IPV6_HLEN
        ip_len = ((pkt[h.IPV6_PAYLOAD_LEN] << 8) | pkt[h.IPV6_PAYLOAD_LEN + 1]) + h.IPV6_HLEN
        if ip_len > n:
            return DropReason.TRUNCATED, n
        proto = pkt[h.IPV6_NEXT_HDR]
        fragment = 0
        pseudo = _word_sum(pkt[h.IPV6_SRC : h.IPV6_DST + 16])
    else:
        return DropReason.BAD_HEADER, n
    if proto in (h.IPPROTO_TCP, h.IPPROTO_UDP) and not fragment and ip_len > l3:
        l4 = pkt[l3:ip_len]
        at = h.TCP_CSUM if proto == h.IPPROTO_TCP else h.UDP_CSUM
        if proto == h.IPPROTO_UDP and len(l4) >= at + 2 and l4[at] == 0 and l4[at + 1] == 0:
            # UDP checksum 0: "not computed" in IPv4 (RFC 768), forbidden in IPv6 (RFC 8200 section 8.1)
            if version == 6:
                return DropReason.BAD_L4_CHECKSUM, ip_len
        elif (pseudo + proto + len(l4) + _word_sum(l4)) % M:
            return DropReason.BAD_L4_CHECKSUM, ip_len
    return DropReason.NONE, ip_len
