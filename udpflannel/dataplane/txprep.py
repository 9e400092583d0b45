"""TX preparation over a whole batch of TUN reads: finish the partial L4 checksums of non-GSO rows (what the
kernel leaves with NEEDS_CSUM when the TUN has checksum offload), all rows at once instead of one
packet.gso call per row (small ACKs would otherwise cost a full split each), and hash flows to pick an
outer source port. Arrays in, arrays out; no I/O.
"""

from __future__ import annotations

import struct

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import M, finish, inet_sum_rows, sum_rows_raw
from udpflannel.packet.drops import DropReason

FLOW_HASH_BYTES = 44  # flow_hash reads this many bytes of each packet
_K4 = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], dtype=np.uint64)
_K6 = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0x85EBCA77C2B2AE63,
        0x27D4EB2F165667C5,
        0xFF51AFD7ED558CCD,
        0xC4CEB9FE1A85EC53,
        0x94D049BB133111EB,
        0xBF58476D1CE4E5B9,
    ],
    dtype=np.uint64,
)


def flow_hash(buf: np.ndarray, offset: int, n: int) -> np.ndarray:
    """uint32 per packet from addresses and the first 4 L4 bytes (ports): one flow, one hash.

    Multiply-add over 32-bit words (IPv4: src, dst, ports; IPv6: src, dst, ports) with odd 64-bit constants,
    then the high half. Assumes no IPv4 options / IPv6 extension headers for the port word, which only
    weakens the spread, never the one-flow-one-hash property.
    """
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    head = np.ascontiguousarray(buf[:n, offset : offset + FLOW_HASH_BYTES])
    if head.shape[1] < FLOW_HASH_BYTES:  # rows narrower than that (never a TUN read's): zeros past the end
        head = np.pad(head, ((0, 0), (0, FLOW_HASH_BYTES - head.shape[1])))
    w = head.view("<u4").astype(np.uint64)  # [n, 11] words at byte 0, 4, ..., 40
    h4 = (w[:, 3:6] * _K4).sum(axis=1, dtype=np.uint64)  # bytes 12..24
    h6 = (w[:, 2:11] * _K6).sum(axis=1, dtype=np.uint64)  # bytes 8..44
    hv = np.where((head[:, 0] >> 4) == 6, h6, h4)
    hv ^= hv >> np.uint64(29)
    return (hv >> np.uint64(32)).astype(np.uint32)


_K4_INTS, _K6_INTS = tuple(int(k) for k in _K4), tuple(int(k) for k in _K6)
_U64 = (1 << 64) - 1
_WORDS4, _WORDS6 = struct.Struct("<3I"), struct.Struct("<9I")


def flow_hash_one(head: bytes) -> int:
    """flow_hash of one packet (`head`: its first 44 bytes, or as many as it has, zero-padded) in plain
    Python: a lone packet (a ping, a first SYN) costs ~2 us this way against ~40 in array calls."""
    if len(head) < FLOW_HASH_BYTES:
        head = head.ljust(FLOW_HASH_BYTES, b"\0")
    if head[0] >> 4 == 6:
        words, consts = _WORDS6.unpack_from(head, 8), _K6_INTS
    else:
        words, consts = _WORDS4.unpack_from(head, 12), _K4_INTS
    hv = sum(w * k for w, k in zip(words, consts, strict=True)) & _U64
    hv ^= hv >> 29
    return hv >> 32


# Up to this many rows are finished one by one in plain Python: cheaper than ~10 array operations per
# distinct csum_start when a TUN batch holds a few ACKs.
PER_ROW_MAX = 16


def finish_partial(packet: memoryview, start: int, field: int) -> bool:
    """One packet's partial L4 checksum (NEEDS_CSUM with csum_start, csum_offset) finished in place, as
    finish_partial_checksums does for many; False, the packet untouched, when they point outside it. The
    bytes from csum_start read as one big-endian integer are congruent (mod 0xFFFF) to their one's-
    complement sum, since 2**16 is 1 mod 0xFFFF."""
    ln = len(packet)
    if start < 20 or start + field + 2 > ln:
        return False
    x = int.from_bytes(packet[start:], "big")
    if (ln - start) & 1:
        x <<= 8  # an odd tail byte is the high byte of a zero-padded word
    c = M if x == 0 else M - 1 - (x - 1) % M
    if c == 0 and field == h.UDP_CSUM:
        c = M  # RFC 768: a computed 0 is sent as all ones
    packet[start + field] = c >> 8
    packet[start + field + 1] = c & 0xFF
    return True


def finish_partial_checksums(
    batch: PacketBatch, headers: np.ndarray, rows: np.ndarray, *, per_row_max: int = PER_ROW_MAX
) -> np.ndarray:
    """Complete the L4 checksum of each row in `rows` (gso_type NONE, NEEDS_CSUM) in place.

    The field at csum_start + csum_offset already holds the pseudo-header sum, so the checksum is the
    complement of the sum from csum_start to the end (virtio spec 5.1.6.2). Returns DropReason codes for
    `rows` (BAD_HEADER when csum_start/csum_offset point outside the packet).
    """
    codes = np.zeros(len(rows), dtype=np.uint8)
    if len(rows) == 0:
        return codes
    off = batch.offset
    if len(rows) <= per_row_max:
        lengths = batch.lengths
        for j, (i, hdr) in enumerate(zip(rows.tolist(), headers[rows].tolist(), strict=True)):
            if not finish_partial(batch.buf[i].data[off : off + int(lengths[i])], hdr[4], hdr[5]):
                codes[j] = DropReason.BAD_HEADER
        return codes
    start = headers["csum_start"][rows].astype(np.int64)
    field = headers["csum_offset"][rows].astype(np.int64)
    lens = batch.lengths[rows].astype(np.int64)
    # Any L4 checksum field qualifies (TCP 16, UDP 6, ICMPv6 2): the arithmetic is the same.
    ok = (start >= 20) & (start + field + 2 <= lens)
    codes[~ok] = DropReason.BAD_HEADER
    for s in sorted(set(start[ok].tolist())):  # a set: np.unique costs more for the few values there are
        pick = ok & (start == s)
        sel = rows[pick]
        span = lens[pick] - s
        sums = inet_sum_rows(batch.buf[sel, off + s : off + s + int(span.max())], span)
        c = finish(sums).astype(np.int64)
        is_udp = field[pick] == h.UDP_CSUM
        c[is_udp & (c == 0)] = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
        at = off + s + field[pick]
        batch.buf[sel, at] = (c >> 8).astype(np.uint8)
        batch.buf[sel, at + 1] = (c & 0xFF).astype(np.uint8)
    return codes


def finish_run_checksums(batch: PacketBatch, start: int, field: int) -> bool:
    """finish_partial_checksums for every row of a batch whose rows share csum_start and csum_offset (one
    flow's packets): summed on a view of the rows, no gather, ~10 array operations. False, nothing changed,
    when the offsets do not fit every row (the general path then judges each)."""
    n, off = batch.n, batch.offset
    lens = batch.lengths[:n]
    if start < 20 or start + field + 2 > int(lens.min()):
        return False
    span = lens - start
    c = finish(sum_rows_raw(batch.buf[:n, off + start : off + start + int(span.max())], span))
    if field == h.UDP_CSUM:
        c[c == 0] = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
    at = off + start + field
    batch.buf[:n, at : at + 2].view(">u2")[:, 0] = c
    return True


def is_gso(headers: np.ndarray) -> np.ndarray:
    """Rows that are superpackets to split (any gso_type but NONE)."""
    return headers["gso_type"] != 0


def needs_csum(headers: np.ndarray) -> np.ndarray:
    return (headers["flags"] & 1) != 0
