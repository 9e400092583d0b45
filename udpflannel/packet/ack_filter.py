"""ACK filtering for one TUN read or one receive from a peer: a TCP flow's pure ACK that a later pure ACK of
the same flow in the same batch makes redundant is left out, as sch_cake's ack-filter does (conservative
rules below).

TCP acknowledges cumulatively, so once a later ACK with a higher acknowledgment number is on its way, an
earlier one tells the sender nothing new; read together, they are microseconds apart, so the sender's clock
loses nothing either. What always stays: duplicate ACKs (the same acknowledgment number: fast retransmit
counts them), ACKs with SACK or any option but timestamps, with any flag but ACK, with data, whose
window shrank, that differ in ECN bits, and every packet around a flow's non-ACK packet. Both ends keep
fewer packets to carry: the receiving pod sends ~3-4 ACKs per read at bulk rates, and a kernel VXLAN
receiver's ACKs reach a sending node a train at a time."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from udpflannel.packet import headers as h

_TS_OPTIONS = b"\x01\x01\x08\x0a"  # NOP, NOP, timestamps (kind 8, length 10): Linux's only option on ACKs
_SEQ_HALF = 1 << 31
_SEQ_MOD = 1 << 32
_V4 = h.IPV4_MIN_HLEN
_V6 = h.IPV6_HLEN
# The fields read, IPv4 (no options) then TCP: version+IHL, TOS, total length, fragment word, protocol,
# addresses and ports, acknowledgment number, data offset, flags, window.
_IPV4_TCP = struct.Struct("!BBH2xHxB2x12s4xIBBH")
# IPv6 then TCP: version and the traffic class's high bits, the rest of the class, payload length, next
# header, addresses and ports, and the same TCP fields.
_IPV6_TCP = struct.Struct("!BB2xHBx36s4xIBBH")
HEAD_BYTES = _V6 + 32  # the bytes of a packet the filter reads: an IPv6 pure ACK with timestamps
assert _IPV4_TCP.size == _V4 + h.TCP_WINDOW + 2 and _IPV6_TCP.size == _V6 + h.TCP_WINDOW + 2


def _tcp_fields(p: bytes, at: int, ln: int) -> tuple[tuple[int, bytes], int, int, bool] | None:
    """(flow key, acknowledgment number, window, pure ACK) of the packet of `ln` bytes whose first bytes lie
    at p[at:] (at least min(ln, HEAD_BYTES)); None unless it is TCP with no IPv4 options or IPv6 extension
    headers. The key holds the addresses, ports and the IPv4 TOS / IPv6 traffic-class bits (ECN marks keep
    ACKs apart)."""
    if ln < _V4 + h.TCP_MIN_HLEN:
        return None
    lead = p[at]
    if lead == 0x45:  # IPv4, no options
        _, tos, total, frag, proto, flow, ack, doff, flags, window = _IPV4_TCP.unpack_from(p, at)
        if proto != h.IPPROTO_TCP or frag & h.IPV4_MF_OFFSET_MASK:
            return None
        t = _V4
        whole = total == ln
    elif lead >> 4 == 6 and ln >= _V6 + h.TCP_MIN_HLEN:
        lead, tos, payload, proto, flow, ack, doff, flags, window = _IPV6_TCP.unpack_from(p, at)
        if proto != h.IPPROTO_TCP:
            return None
        t = _V6
        tos |= lead << 8
        whole = payload + t == ln
    else:
        return None
    doff = (doff >> 4) * 4
    pure = (
        whole
        and flags == h.TCP_ACK_FLAG
        and t + doff == ln
        and (doff == h.TCP_MIN_HLEN or (doff == 32 and p[at + t + 20 : at + t + 24] == _TS_OPTIONS))
    )
    return (tos, flow), ack, window, pure


def _fields_at(heads: bytes, at: int, width: int, ln: int) -> tuple[tuple[int, bytes], int, int, bool] | None:
    """_tcp_fields of the packet of `ln` bytes whose first `width` bytes are heads[at:]; None when they are
    fewer than it reads (a row narrower than HEAD_BYTES holding a longer packet)."""
    return _tcp_fields(heads, at, ln) if ln <= width or width == HEAD_BYTES else None


def redundant_acks(buf: np.ndarray, off: int, lengths: list[int], rows: Sequence[int]) -> set[int]:
    """The rows of `rows` (ascending; packets at buf[row, off:], lengths[row] bytes, in read order) that are
    pure ACKs made redundant by a later pure ACK of the same flow: a higher acknowledgment number (mod
    2**32), a window no smaller, and no other packet of that flow between them."""
    first = rows[0]
    heads = buf[first : rows[-1] + 1, off : off + HEAD_BYTES].tobytes()  # one array call, then plain Python
    width = len(heads) // (rows[-1] + 1 - first)  # HEAD_BYTES, or less when the rows are narrower
    later: dict[tuple[int, bytes], tuple[int, int]] = {}  # flow -> (ack, window) of its next ACK that stays
    redundant: set[int] = set()
    for i in reversed(rows):
        fields = _fields_at(heads, (i - first) * width, width, lengths[i])
        if fields is None:
            continue
        key, ack, window, pure = fields
        if not pure:
            later.pop(key, None)  # nothing before this packet of its flow is judged against ACKs after it
            continue
        nxt = later.get(key)
        if nxt is not None and 0 < (nxt[0] - ack) % _SEQ_MOD < _SEQ_HALF and nxt[1] >= window:
            redundant.add(i)
        else:
            later[key] = (ack, window)
    return redundant


def is_pure_ack(buf: np.ndarray, off: int, row: int, length: int) -> bool:
    """The packet in `row` is a pure ACK."""
    head = buf[row, off : off + HEAD_BYTES].tobytes()
    fields = _fields_at(head, 0, len(head), length)
    return fields is not None and fields[3]
