"""ACK filtering for one TUN read: a TCP flow's pure ACK that a later pure ACK of the same flow in the same
read makes redundant is left out, as sch_cake's ack-filter does (conservative rules below).

TCP acknowledges cumulatively, so once a later ACK with a higher acknowledgment number is on its way, an
earlier one tells the sender nothing new; read together, they are microseconds apart, so the sender's clock
loses nothing either. What always stays: duplicate ACKs (the same acknowledgment number: fast retransmit
counts them), ACKs with SACK or any option but timestamps, with any flag but ACK, with data, whose
window shrank, that differ in ECN bits, and every packet around a flow's non-ACK packet. Both ends keep
fewer packets to carry: the receiving pod sends ~3-4 ACKs per read at bulk rates."""

from __future__ import annotations

import numpy as np

from udpflannel.packet import headers as h

_TS_OPTIONS = b"\x01\x01\x08\x0a"  # NOP, NOP, timestamps (kind 8, length 10): Linux's only option on ACKs
_SEQ_HALF = 1 << 31
_SEQ_MOD = 1 << 32


def _tcp_fields(p: bytes, ln: int) -> tuple[bytes, int, int, bool] | None:
    """(flow key, acknowledgment number, window, pure ACK) of a TCP packet with no IPv4 options or IPv6
    extension headers, from its first bytes `p` and its length; None for anything else. The key holds the
    addresses, ports and the IPv4 TOS / IPv6 traffic-class bits (ECN marks keep ACKs apart)."""
    if len(p) < h.IPV4_MIN_HLEN + h.TCP_MIN_HLEN:
        return None
    lead = p[0]
    if lead == 0x45:  # IPv4, no options
        if p[h.IPV4_PROTO] != h.IPPROTO_TCP or int.from_bytes(p[6:8]) & h.IPV4_MF_OFFSET_MASK:
            return None
        t = h.IPV4_MIN_HLEN
        key = p[h.IPV4_TOS : h.IPV4_TOS + 1] + p[h.IPV4_SRC : t + h.TCP_SEQ]
        whole = int.from_bytes(p[h.IPV4_TOTAL_LEN : h.IPV4_TOTAL_LEN + 2]) == ln
    elif lead >> 4 == 6:
        if p[h.IPV6_NEXT_HDR] != h.IPPROTO_TCP or len(p) < h.IPV6_HLEN + h.TCP_MIN_HLEN:
            return None
        t = h.IPV6_HLEN
        key = p[0:2] + p[h.IPV6_SRC : t + h.TCP_SEQ]
        whole = int.from_bytes(p[h.IPV6_PAYLOAD_LEN : h.IPV6_PAYLOAD_LEN + 2]) + t == ln
    else:
        return None
    doff = (p[t + h.TCP_DOFF] >> 4) * 4
    pure = (
        whole
        and p[t + h.TCP_FLAGS] == h.TCP_ACK_FLAG
        and t + doff == ln
        and (doff == h.TCP_MIN_HLEN or (doff == 32 and p[t + 20 : t + 24] == _TS_OPTIONS))
    )
    ack = int.from_bytes(p[t + h.TCP_ACK : t + h.TCP_ACK + 4])
    window = int.from_bytes(p[t + h.TCP_WINDOW : t + h.TCP_WINDOW + 2])
    return key, ack, window, pure


HEAD_BYTES = h.IPV6_HLEN + 32  # the bytes of a row _tcp_fields reads: the longest pure ACK's headers


def redundant_acks(buf: np.ndarray, off: int, lengths: list[int], rows: list[int]) -> set[int]:
    """The rows of `rows` (packets at buf[row, off:], lengths[row] bytes, in read order) that are pure ACKs
    made redundant by a later pure ACK of the same flow: a higher acknowledgment number (mod 2**32), a
    window no smaller, and no other packet of that flow between them."""
    later: dict[bytes, tuple[int, int]] = {}  # flow -> (ack, window) of its next pure ACK that stays
    redundant: set[int] = set()
    for i in reversed(rows):
        ln = lengths[i]
        fields = _tcp_fields(buf[i, off : off + min(ln, HEAD_BYTES)].tobytes(), ln)
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
