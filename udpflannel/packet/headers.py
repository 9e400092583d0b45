"""Named byte offsets and values of the IPv4, IPv6, TCP and UDP headers (RFC 791, 8200, 9293, 768).

Every module that touches a header field uses these names, so each offset is written once."""

from __future__ import annotations

import numpy as np

IPPROTO_TCP = 6
IPPROTO_UDP = 17

# IPv4 (RFC 791 section 3.1)
IPV4_VER_IHL = 0
IPV4_TOS = 1
IPV4_TOTAL_LEN = 2
IPV4_ID = 4
IPV4_FRAG = 6  # flags (DF = 0x40 in this byte) and fragment offset
IPV4_TTL = 8
IPV4_PROTO = 9
IPV4_CSUM = 10
IPV4_SRC = 12
IPV4_DST = 16
IPV4_MIN_HLEN = 20
IPV4_MAX_HLEN = 60
IPV4_DF = 0x40  # in byte IPV4_FRAG
IPV4_MF_OFFSET_MASK = 0x3FFF  # MF bit and fragment offset, in the 16-bit word at IPV4_FRAG

# IPv6 (RFC 8200 section 3)
IPV6_VER_TC_FLOW = 0
IPV6_PAYLOAD_LEN = 4
IPV6_NEXT_HDR = 6
IPV6_HOP_LIMIT = 7
IPV6_SRC = 8
IPV6_DST = 24
IPV6_HLEN = 40

# TCP (RFC 9293 section 3.1)
TCP_SPORT = 0
TCP_DPORT = 2
TCP_SEQ = 4
TCP_ACK = 8
TCP_DOFF = 12  # data offset in the high nibble, in 32-bit words
TCP_FLAGS = 13
TCP_WINDOW = 14
TCP_CSUM = 16
TCP_URG = 18
TCP_MIN_HLEN = 20
TCP_MAX_HLEN = 60

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK_FLAG = 0x10
TCP_URG_FLAG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

# UDP (RFC 768)
UDP_SPORT = 0
UDP_DPORT = 2
UDP_LEN = 4
UDP_CSUM = 6
UDP_HLEN = 8

IP_MAXPACKET = 65535  # largest IPv4 total length / IPv6 payload length without jumbograms

# The same headers as numpy structured dtypes (network byte order), so a column of a batch can be viewed
# as one record per row: rows_view(buf, col, TCP_HDR)["seq"] is every row's sequence number.
IPV4_HDR = np.dtype(
    [
        ("ver_ihl", "u1"),
        ("tos", "u1"),
        ("total_len", ">u2"),
        ("id", ">u2"),
        ("frag", ">u2"),
        ("ttl", "u1"),
        ("proto", "u1"),
        ("csum", ">u2"),
        ("src", ">u4"),
        ("dst", ">u4"),
    ]
)
IPV6_HDR = np.dtype(
    [
        ("ver_tc_flow", ">u4"),
        ("payload_len", ">u2"),
        ("next_hdr", "u1"),
        ("hop_limit", "u1"),
        ("src", ">u2", (8,)),
        ("dst", ">u2", (8,)),
    ]
)
TCP_HDR = np.dtype(
    [
        ("sport", ">u2"),
        ("dport", ">u2"),
        ("seq", ">u4"),
        ("ack", ">u4"),
        ("doff", "u1"),
        ("flags", "u1"),
        ("window", ">u2"),
        ("csum", ">u2"),
        ("urg", ">u2"),
    ]
)
UDP_HDR = np.dtype([("sport", ">u2"), ("dport", ">u2"), ("len", ">u2"), ("csum", ">u2")])


def rows_view(buf: np.ndarray, col: int, dtype: np.dtype, n: int | None = None) -> np.ndarray:
    """A writable [n] record view of the `dtype`-sized header starting at column `col` of every row."""
    rows = buf.shape[0] if n is None else n
    if buf.flags.c_contiguous:
        return np.ndarray((rows,), dtype, buffer=buf, offset=col, strides=(buf.strides[0],))
    return buf[:rows, col : col + dtype.itemsize].view(dtype)[:, 0]
