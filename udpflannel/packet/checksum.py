"""Internet checksum (RFC 1071) over batches: one numpy pass sums every row, plus pseudo-header sums.

Sums are int64 arrays. A "sum" here is any integer congruent (mod 0xFFFF) to the one's-complement sum in
network byte order; `fold` turns it into the 16-bit value and `finish` into the checksum field. Folding by
`% 0xFFFF` instead of carry loops keeps it to one array operation, and byte order is a multiplication:
swapping the bytes of a 16-bit value is multiplying it by 256 mod 0xFFFF, so rows are summed as
little-endian uint32 words and scaled once (RFC 1071 section 2(B): byte-order independence)."""

from __future__ import annotations

import struct

import numpy as np

M = 0xFFFF
_I64 = np.int64


def fold(s: np.ndarray | int) -> np.ndarray:
    """The folded 16-bit one's-complement sum (1..0xFFFF for a positive sum, 0 for 0)."""
    s = np.asarray(s, dtype=_I64)
    return np.where(s == 0, 0, (s - 1) % M + 1)


def finish(s: np.ndarray | int) -> np.ndarray:
    """The checksum field value for sum(s): the complement of its fold."""
    s = np.asarray(s, dtype=_I64)
    return np.where(s == 0, M, M - 1 - (s - 1) % M)


def finish_positive(s: np.ndarray) -> np.ndarray:
    """`finish` for sums known to be positive (any pseudo-header sum is): one array operation fewer."""
    return M - 1 - (s - 1) % M


def finish_udp(s: np.ndarray | int) -> np.ndarray:
    """As `finish`, but a computed 0 is sent as 0xFFFF: 0 means "no checksum" in UDP (RFC 768)."""
    s = np.asarray(s, dtype=_I64)
    return M - s % M


def _tail_words(rows: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The 1-3 bytes after each row's last whole word, as a little-endian word (bytes past the end are 0)."""
    n, width = rows.shape
    idx = (q * 4)[:, None] + np.arange(3)
    vals = rows[np.arange(n)[:, None], np.minimum(idx, width - 1)].astype(_I64)
    vals[np.arange(3) >= r[:, None]] = 0
    return vals[:, 0] | (vals[:, 1] << 8) | (vals[:, 2] << 16)


def sum_rows_raw(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Unfolded sum (see module doc) of rows[i, :lengths[i]] for every row; bytes past each length may hold
    anything. Rows of the longest length (a train: all but its last) take one pass plus a few tail
    columns; up to 8 other rows are summed one by one, more through a mask."""
    n = rows.shape[0]
    if n == 0:
        return np.zeros(0, _I64)
    lengths = np.asarray(lengths, dtype=_I64)
    lmax = int(lengths.max())
    qmax, r = lmax >> 2, lmax & 3
    if qmax:
        words = rows[:, : qmax * 4].view("<u4")
        s = words.sum(axis=1, dtype=_I64)
    else:
        s = np.zeros(n, _I64)
    if r:  # the 1-3 bytes after the last whole word of the longest rows, as a little-endian word
        c = qmax * 4
        s += rows[:, c]
        if r > 1:
            s += rows[:, c + 1].astype(_I64) << 8
        if r > 2:
            s += rows[:, c + 2].astype(_I64) << 16
    short = np.flatnonzero(lengths != lmax)
    if short.size:
        if short.size <= 8:
            for i in short.tolist():
                # network-order sum as one integer (2**16 is 1 mod 0xFFFF), times 256 to the LE domain
                # (256 * 256 is 1 mod 0xFFFF, so the final * 256 below undoes it)
                ln = int(lengths[i])
                x = int.from_bytes(rows[i, :ln].tobytes(), "big")
                x = x << 8 if ln & 1 else x
                s[i] = ((x - 1) % M + 1 if x else 0) * 256  # folded: a positive sum stays positive
        else:
            q, rr = lengths[short] >> 2, lengths[short] & 3
            sub = words[short] if qmax else np.zeros((short.size, 0), np.uint32)
            sub[np.arange(qmax) >= q[:, None]] = 0
            s[short] = sub.sum(axis=1, dtype=_I64) + _tail_words(rows[short], q, rr)
    return s * 256  # little-endian words to network order (mod 0xFFFF)


def inet_sum_rows(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Folded one's-complement sum of rows[i, :lengths[i]] for every row (network order, int64 [n])."""
    return fold(sum_rows_raw(rows, lengths))


def inet_checksum_rows(rows: np.ndarray, lengths: np.ndarray, initial: np.ndarray | int = 0) -> np.ndarray:
    """Internet checksum of every row, starting from a per-row initial sum (e.g. the pseudo-header)."""
    return finish(sum_rows_raw(rows, lengths) + np.asarray(initial, dtype=_I64))


def inet_sum(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """Folded one's-complement sum of one buffer (network order)."""
    a = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if len(a) % 2:
        a = np.concatenate((a, np.zeros(1, np.uint8)))
    return int(fold(int(a.view(">u2").sum(dtype=_I64))))


def _be16_sum(addr: np.ndarray) -> np.ndarray:
    """Sum of the big-endian 16-bit words of each row of a uint8 [n, 2k] address array."""
    a = addr.astype(_I64)
    return (a[:, 0::2] * 256 + a[:, 1::2]).sum(axis=1)


def pseudo_sum_v4(src: np.ndarray, dst: np.ndarray, proto: int | np.ndarray, l4len: np.ndarray) -> np.ndarray:
    """RFC 793/768 IPv4 pseudo-header sum: src, dst (uint8 [n, 4]), zero+protocol, L4 length."""
    return fold(_be16_sum(src) + _be16_sum(dst) + np.asarray(proto, _I64) + np.asarray(l4len, _I64))


def pseudo_sum_v6(src: np.ndarray, dst: np.ndarray, nh: int | np.ndarray, l4len: np.ndarray) -> np.ndarray:
    """RFC 8200 section 8.1 pseudo-header sum: src, dst (uint8 [n, 16]), 32-bit length, next header."""
    length = np.asarray(l4len, dtype=_I64)
    s = _be16_sum(src) + _be16_sum(dst) + (length >> 16) + (length & M)
    return fold(s + np.asarray(nh, dtype=_I64))


def bytes_sum(data: bytes | bytearray | memoryview) -> int:
    """Unfolded sum of the big-endian 16-bit words of a short byte string (headers), in plain Python."""
    b = bytes(data)
    if len(b) % 2:
        b += b"\0"
    return sum(struct.unpack(f"!{len(b) // 2}H", b))
