"""flannel's udp backend on the wire: the UDP payload is the bare inner IP packet (no header), port 8285.
Also the proxy's per-hop rule: the TTL / hop limit is decremented, with the IPv4 checksum fixed incrementally
(RFC 1624). Sans-I/O: no sockets, no clock.
"""

from __future__ import annotations

import numpy as np

from udpflannel.codec.wire import UDP_OVERHEAD, UDP_PORT  # noqa: F401  (re-exported)
from udpflannel.packet import headers as h

IPV4_MIN_HEADER = 20
IPV6_HEADER = 40

# Result codes of decode_batch; the dataplane maps them to its DropReason members.
OK = 0
BAD_HEADER = 1  # not an IPv4/IPv6 packet, or shorter than its header / its own length field
TTL_EXCEEDED = 2  # TTL/hop limit would reach zero on this hop


def decode_batch(buf: np.ndarray, lengths: np.ndarray, offset: int) -> np.ndarray:
    """Validate a batch of udp-backend payloads (packet i at buf[i, offset:offset + lengths[i]]).

    Checks the IP version, a minimal header length and that the IP length field fits the datagram.
    Returns uint8 result codes [n].
    """
    n = len(lengths)
    codes = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return codes
    lens = lengths[:n].astype(np.int64)
    width = buf.shape[1] - offset
    if width >= 8:
        hdr = buf[:n, offset : offset + 8].astype(np.int64)
    else:  # a UDP_GRO train of tiny datagrams: rows read as zero-padded, all of them too short
        hdr = np.zeros((n, 8), np.int64)
        hdr[:, : max(width, 0)] = buf[:n, offset:]
    version = hdr[:, 0] >> 4
    is_v4 = version == 4
    is_v6 = version == 6
    v4_total = (hdr[:, 2] << 8) | hdr[:, 3]
    v4_ihl = (hdr[:, 0] & 0x0F) * 4
    v6_total = ((hdr[:, 4] << 8) | hdr[:, 5]) + IPV6_HEADER
    ok_v4 = is_v4 & (lens >= IPV4_MIN_HEADER) & (v4_ihl >= IPV4_MIN_HEADER) & (v4_total >= v4_ihl)
    ok_v4 &= v4_total <= lens
    ok_v6 = is_v6 & (lens >= IPV6_HEADER) & (v6_total <= lens)
    codes[~(ok_v4 | ok_v6)] = BAD_HEADER
    return codes


def decrement_ttl_batch(buf: np.ndarray, lengths: np.ndarray, offset: int, valid: np.ndarray) -> np.ndarray:
    """Decrement TTL (v4, fixing the header checksum) or hop limit (v6) of every row where `valid`.

    Returns a bool mask of rows whose TTL was <= 1 (left untouched): they must be dropped and answered with
    ICMP time exceeded, as a router would.
    """
    n = len(lengths)
    expired = np.zeros(n, dtype=bool)
    # Only valid rows are read: the others may be narrower than an IP header (a train of tiny datagrams).
    rows = np.flatnonzero(valid[:n])
    if len(rows) == 0:
        return expired
    version = buf[rows, offset] >> 4
    v4, v6 = rows[version == 4], rows[version == 6]
    ttl4, ttl6 = buf[v4, offset + 8], buf[v6, offset + 7]
    expired[v4[ttl4 <= 1]] = True
    expired[v6[ttl6 <= 1]] = True
    dec_v6 = v6[ttl6 > 1]
    if len(dec_v6):
        buf[dec_v6, offset + 7] -= 1
    r = v4[ttl4 > 1]
    if len(r):
        buf[r, offset + 8] -= 1
        # RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'); the 16-bit word holding TTL went down by 0x0100.
        old = (buf[r, offset + 10].astype(np.uint32) << 8) | buf[r, offset + 11]
        s = (~old & 0xFFFF) + 0xFEFF  # ~m + m' == ~0x0100 (mod 0xFFFF, one's complement)
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        new = ~s & 0xFFFF
        buf[r, offset + 10] = (new >> 8).astype(np.uint8)
        buf[r, offset + 11] = (new & 0xFF).astype(np.uint8)
    return expired


def decrement_ttl_rows(buf: np.ndarray, offset: int, rows: list[int]) -> dict[int, bool]:
    """flannel's udp proxy rule for the superpacket rows of a TUN batch: TTL / hop limit down by one in the
    header (the split then gives every segment the new value and a checksum to match). Row -> done; rows
    at TTL <= 1 (or not IP) are left alone for the general path to answer."""
    done: dict[int, bool] = {}
    for i in rows:
        version = buf[i, offset] >> 4
        col = offset + (h.IPV4_TTL if version == 4 else h.IPV6_HOP_LIMIT)
        done[i] = version in (4, 6) and buf[i, col] > 1
        if done[i]:
            buf[i, col] -= 1
    return done
