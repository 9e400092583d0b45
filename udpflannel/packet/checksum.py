"""Internet checksum (RFC 1071) over batches: one numpy pass sums every row, plus pseudo-header sums.

Sums are kept as folded 16-bit values in network byte order (uint64 arrays); `finish` complements them.
Rows are summed as little-endian uint32 words and byte-swapped once at the end (RFC 1071 section 2(B):
the one's-complement sum is independent of byte order)."""

from __future__ import annotations

import numpy as np

_U64 = np.uint64


def fold(s: np.ndarray | int) -> np.ndarray:
    """Fold a 64-bit one's-complement sum to 16 bits (mod 0xFFFF, never returning 0x10000)."""
    s = np.asarray(s, dtype=_U64)
    s = (s & _U64(0xFFFFFFFF)) + (s >> _U64(32))
    s = (s & _U64(0xFFFF)) + (s >> _U64(16))
    s = (s & _U64(0xFFFF)) + (s >> _U64(16))
    return (s & _U64(0xFFFF)) + (s >> _U64(16))


def swap16(s: np.ndarray) -> np.ndarray:
    return ((s & _U64(0xFF)) << _U64(8)) | (s >> _U64(8))


def finish(s: np.ndarray) -> np.ndarray:
    """The checksum field value (network order, as integers) for folded sum(s)."""
    return (~fold(s)) & _U64(0xFFFF)


def finish_udp(s: np.ndarray) -> np.ndarray:
    """As `finish`, but a computed 0 is sent as 0xFFFF: 0 means "no checksum" in UDP (RFC 768)."""
    c = finish(s)
    c[c == 0] = 0xFFFF
    return c


def _tail_words(rows: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The 1-3 bytes after each row's last whole word, as a little-endian word (bytes past the end are 0)."""
    n, width = rows.shape
    ar = np.arange(n)[:, None]
    idx = (q * 4)[:, None] + np.arange(3)
    vals = rows[ar, np.minimum(idx, width - 1)].astype(_U64)
    vals[np.arange(3) >= r[:, None]] = 0
    return vals[:, 0] | (vals[:, 1] << _U64(8)) | (vals[:, 2] << _U64(16))


def inet_sum_rows(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Folded one's-complement sum of rows[i, :lengths[i]] for every row (network order, uint64 [n]).

    Bytes after each row's length may hold anything: they are never summed. The common shapes (all rows
    the same length, or all but a few) are summed in one pass; arbitrary mixes fall back to a mask."""
    n = rows.shape[0]
    if n == 0:
        return np.zeros(0, _U64)
    lengths = np.asarray(lengths, dtype=np.int64)
    q = lengths >> 2
    r = lengths & 3
    qmax = int(q.max())
    if qmax == 0:
        return swap16(fold(_tail_words(rows, q, r)))
    words = rows[:, : qmax * 4].view("<u4")
    s = words.sum(axis=1, dtype=_U64)
    short = np.flatnonzero(q != qmax)
    if short.size:
        if short.size <= 8:
            for i in short.tolist():
                s[i] = words[i, : q[i]].sum(dtype=_U64)
        else:
            sub = words[short]
            sub[np.arange(qmax) >= q[short][:, None]] = 0
            s[short] = sub.sum(axis=1, dtype=_U64)
    if r.any():
        s += _tail_words(rows, q, r)
    return swap16(fold(s))


def inet_checksum_rows(rows: np.ndarray, lengths: np.ndarray, initial: np.ndarray | int = 0) -> np.ndarray:
    """Internet checksum of every row, starting from a per-row initial sum (e.g. the pseudo-header)."""
    return finish(inet_sum_rows(rows, lengths) + np.asarray(initial, dtype=_U64))


def inet_sum(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """Folded one's-complement sum of one buffer (network order)."""
    a = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    return int(inet_sum_rows(a[None, :], np.array([len(a)]))[0])


def _be16_pairs(addr: np.ndarray) -> np.ndarray:
    """Sum of the big-endian 16-bit words of each row of a uint8 [n, 2k] address array."""
    a = addr.astype(_U64)
    return ((a[:, 0::2] << _U64(8)) | a[:, 1::2]).sum(axis=1, dtype=_U64)


def pseudo_sum_v4(src: np.ndarray, dst: np.ndarray, proto: int | np.ndarray, l4len: np.ndarray) -> np.ndarray:
    """RFC 793/768 IPv4 pseudo-header sum: src, dst (uint8 [n, 4]), zero+protocol, L4 length."""
    s = _be16_pairs(src) + _be16_pairs(dst)
    s = s + np.asarray(proto, dtype=_U64) + np.asarray(l4len, dtype=_U64)
    return fold(s)


def pseudo_sum_v6(src: np.ndarray, dst: np.ndarray, nh: int | np.ndarray, l4len: np.ndarray) -> np.ndarray:
    """RFC 8200 section 8.1 pseudo-header sum: src, dst (uint8 [n, 16]), 32-bit length, next header."""
    length = np.asarray(l4len, dtype=_U64)
    s = _be16_pairs(src) + _be16_pairs(dst) + (length >> _U64(16)) + (length & _U64(0xFFFF))
    return fold(s + np.asarray(nh, dtype=_U64))
