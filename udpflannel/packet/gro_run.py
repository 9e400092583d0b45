"""GRO of the commonest train in about fifteen array operations: every row one full-size segment of one TCP
flow but the last (which may be shorter), flags exactly ACK (the last may add PSH), adjacent sequence
numbers, every checksum right, one superpacket of at most 64 KiB. A lone UDP_GRO train from a peer that
sent one superpacket looks like this; gro._train, which decides joins row by row, costs about twice as much.

Anything else returns None with nothing changed, and the caller takes the general path, so the bytes
written are always those gro.coalesce writes. The header patch of a merged superpacket lives here too,
shared by gro and gro_trains."""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import M
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR_LEN,
    VNET_HDR_STRUCT,
)

_ACK, _ACK_PSH = h.TCP_ACK_FLAG, h.TCP_ACK_FLAG | h.TCP_PSH
_H = struct.Struct("!H")
_SEQ = struct.Struct("!I")
_IP4 = struct.Struct("!10H")
_ADDR4 = struct.Struct("!4H")
_ADDR6 = struct.Struct("!16H")
_V6_WORDS = struct.Struct("!4H")
_IP4_LE = struct.Struct("<10H")  # an IPv4 header as the little-endian words the row sums use
_H_LE = struct.Struct("<H")


@lru_cache(maxsize=64)
def row_mask(prefix: int, v6: bool, hl: int) -> np.ndarray:
    """16-bit words (all or nothing) of prefix + IP + TCP header that every full-size row repeats from row 0:
    the whole prefix, every IP word but IPv4's id and checksum, the TCP ports, ACK number, data offset and
    flags, and the options; not the sequence number (checked apart), window, checksum or urgent pointer."""
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    mask = np.full((prefix + hl) // 2, 0xFFFF, np.uint16)
    ip = prefix // 2
    if not v6:
        mask[[ip + h.IPV4_ID // 2, ip + h.IPV4_CSUM // 2]] = 0
    tcp = ip + l3 // 2
    for field in (h.TCP_SEQ, h.TCP_SEQ + 2, h.TCP_WINDOW, h.TCP_CSUM, h.TCP_URG):
        mask[tcp + field // 2] = 0
    return mask


def coalesce_run(batch: PacketBatch, prefix: int = 0, *, verified: bool = False) -> memoryview | None:
    """The rows of `batch` as one write (virtio header + superpacket), or None. Each row holds `prefix`
    bytes (e.g. VXLAN and inner Ethernet headers, which the caller judged in row 0; every row must repeat
    them) and then its IP packet; `batch.lengths` count both. `verified`: the IP and TCP checksums were
    checked already (validate_ip)."""
    n, off = batch.n, batch.offset
    if n < 2 or prefix & 1:
        return None
    buf = batch.buf
    inner = off + prefix
    lens = batch.lengths
    first, final = int(lens[0]) - prefix, int(lens[n - 1]) - prefix
    p0 = buf[0, off : inner + h.IPV6_HLEN + h.TCP_MAX_HLEN].tobytes()
    f0 = p0[prefix:]
    head = tcp_head(f0)
    if head is None:
        return None
    v6, ip_len = head
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    doff = f0[l3 + h.TCP_DOFF] >> 4
    hl = l3 + doff * 4
    gso, last = first - hl, final - hl
    if (
        doff < 5
        or len(f0) < hl
        or buf.shape[1] < inner + hl
        or ip_len != first
        or f0[l3 + h.TCP_FLAGS] != _ACK
        or gso <= 0
        or not 0 < last <= gso
        or hl + (n - 1) * gso + last > h.IP_MAXPACKET
    ):
        return None
    if n > 2 and lens[1 : n - 1].tobytes() != lens[: n - 2].tobytes():  # each the same as the one before
        return None
    # Rows 0..n-2: row 0's words where the mask looks (its length and flags included). Native byte order:
    # the mask is whole words, so it reads the same either way, and non-native views cost a byte swap.
    words = buf[: n - 1, off : inner + hl].view(np.uint16)
    if np.count_nonzero((words ^ words[0]) & row_mask(prefix, v6, hl)):
        return None
    # The last row: the same flow, its own length, ACK or ACK|PSH (plain Python: one row).
    last_flags = last_row_flags(p0, buf[n - 1, off : inner + hl].tobytes(), prefix, hl, v6, final)
    if last_flags is None:
        return None
    # Adjacent sequence numbers (uint32 differences wrap as the sequence space does; native order, as
    # arithmetic on a big-endian view byte-swaps per operation).
    seq = buf[:n, inner + l3 + h.TCP_SEQ : inner + l3 + h.TCP_SEQ + 4].view(">u4")[:, 0].astype(np.uint32)
    if np.count_nonzero((seq[1:] - seq[:-1]) != gso):
        return None
    if not verified and not _checksums_ok(buf, n, inner, first, final, f0, v6):
        return None
    return _build(buf, n, inner, hl, l3, gso, last, last_flags, v6)


def join_runs(a: memoryview, b: memoryview) -> memoryview | None:
    """Superpacket `b` appended to superpacket `a` (both writes from coalesce_run) when b carries on a's
    flow where a's last, full-size segment ended: the same headers but length, id, sequence number, window,
    flags and checksums, a's flags ACK, b's sequence number right after a's payload, one segment size, at
    most 64 KiB together. A TCP superpacket the sender had to send as two UDP_SEGMENT messages (65507-byte
    limit) arrives as two trains; joined, it is one TUN write again. None when they do not join."""
    v = VNET_HDR_LEN
    head_a, head_b = VNET_HDR_STRUCT.unpack_from(a, 0), VNET_HDR_STRUCT.unpack_from(b, 0)
    _, kind, hl, gso, l3, _ = head_a
    if head_a != head_b or gso == 0:
        return None
    paid_a, paid_b = len(a) - v - hl, len(b) - v - hl
    total = hl + paid_a + paid_b
    if paid_a % gso or paid_b <= 0 or total > h.IP_MAXPACKET:
        return None
    fa, fb = bytes(a[v : v + hl]), bytes(b[v : v + hl])
    v6 = kind == VIRTIO_NET_HDR_GSO_TCPV6
    flags = last_row_flags(fa, fb, 0, hl, v6, hl + paid_b)
    seq = h.TCP_SEQ + l3
    if (
        flags is None
        or fa[l3 + h.TCP_FLAGS] != _ACK
        or (_SEQ.unpack_from(fa, seq)[0] + paid_a) & 0xFFFFFFFF != _SEQ.unpack_from(fb, seq)[0]
    ):
        return None
    dst = np.empty(v + total, np.uint8)
    dst[: len(a)] = a
    dst[len(a) :] = b[v + hl :]
    mv = memoryview(dst)
    finish_superpacket(mv, v6=v6, hl=hl, l3=l3, gso=gso, total=total, flags=flags)
    return mv


def tcp_head(f: bytes) -> tuple[bool, int] | None:
    """(IPv6?, IP length) when `f` starts a plain TCP packet: IPv4 without options or fragmentation, or
    IPv6 with TCP as the next header; else None. Row 0 of every train is judged by it."""
    if len(f) < h.IPV4_MIN_HLEN + h.TCP_MIN_HLEN:
        return None
    if f[0] == 0x45:
        if f[h.IPV4_PROTO] != h.IPPROTO_TCP or _H.unpack_from(f, h.IPV4_FRAG)[0] & h.IPV4_MF_OFFSET_MASK:
            return None
        return False, _H.unpack_from(f, h.IPV4_TOTAL_LEN)[0]
    if f[0] >> 4 == 6 and len(f) >= h.IPV6_HLEN + h.TCP_MIN_HLEN and f[h.IPV6_NEXT_HDR] == h.IPPROTO_TCP:
        return True, _H.unpack_from(f, h.IPV6_PAYLOAD_LEN)[0] + h.IPV6_HLEN
    return None


def last_row_flags(p0: bytes, pn: bytes, prefix: int, hl: int, v6: bool, final: int) -> int | None:
    """The flags of a train's last row (`pn`: its prefix and headers) when it carries row 0's (`p0`) prefix,
    IP and TCP flow fields and options, its own IP length `final`, and ACK or ACK|PSH; else None."""
    t0 = prefix + (h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN)  # where the TCP header starts
    if v6:
        same_ip = p0[: prefix + 4] == pn[: prefix + 4] and p0[prefix + 6 : t0] == pn[prefix + 6 : t0]
        own_len = _H.unpack_from(pn, prefix + h.IPV6_PAYLOAD_LEN)[0] + h.IPV6_HLEN
    else:
        frag, csum = prefix + h.IPV4_FRAG, prefix + h.IPV4_CSUM  # flags, fragment, TTL, protocol between
        same_ip = (
            p0[: prefix + 2] == pn[: prefix + 2]
            and p0[frag:csum] == pn[frag:csum]
            and p0[prefix + h.IPV4_SRC : t0] == pn[prefix + h.IPV4_SRC : t0]
        )
        own_len = _H.unpack_from(pn, prefix + h.IPV4_TOTAL_LEN)[0]
    flags = pn[t0 + h.TCP_FLAGS]
    if (
        same_ip
        and own_len == final
        and p0[t0 : t0 + h.TCP_SEQ] == pn[t0 : t0 + h.TCP_SEQ]
        and p0[t0 + h.TCP_ACK : t0 + h.TCP_FLAGS] == pn[t0 + h.TCP_ACK : t0 + h.TCP_FLAGS]
        and flags in (_ACK, _ACK_PSH)
        and p0[t0 + h.TCP_MIN_HLEN : prefix + hl] == pn[t0 + h.TCP_MIN_HLEN : prefix + hl]  # options
    ):
        return flags
    return None


def ipv4_header_ok(b: bytes, at: int = 0) -> bool:
    """RFC 791: the IPv4 header (no options) at b[at:] sums to 0 mod 0xFFFF, its checksum included."""
    return sum(_IP4.unpack_from(b, at)) % M == 0


def pseudo_fix(f0: bytes, v6: bool) -> int:
    """What turns the sum of a whole IP packet of this flow (`f0`: its headers) into the sum of its TCP
    pseudo-header and segment, less the IPv4 total length (the caller adds each packet's). IPv4: its header
    adds 0 (mod 0xFFFF) when sound; add addresses, protocol, minus the header length. IPv6: the header
    holds the addresses and payload length already; take out version/class/flow and next header/hop limit,
    add the next header alone."""
    if v6:
        w = _V6_WORDS.unpack_from(f0)
        return 4 * M - w[0] - w[1] - w[3] + h.IPPROTO_TCP
    return sum(_ADDR4.unpack_from(f0, h.IPV4_SRC)) + h.IPPROTO_TCP - h.IPV4_MIN_HLEN


def row_sum_ok(row: np.ndarray, length: int, fix: int) -> bool:
    """One packet's TCP checksum (`row` starts at its IP header), the way _checksums_ok checks many."""
    even = length & ~1
    x = int(row[:even].view("<u2").sum(dtype=np.uint32))
    if length & 1:
        x += int(row[even])
    return (x + fix * 256) % M == 0


def _checksums_ok(buf: np.ndarray, n: int, inner: int, first: int, final: int, f0: bytes, v6: bool) -> bool:
    """IPv4 header checksums, and every row's TCP checksum: the sum of its whole IP packet plus pseudo_fix.
    Sums are of little-endian 16-bit words: 256 x the network-order sum (mod 0xFFFF), which is 0 exactly
    when that is, so the constant is scaled to match rather than every sum. uint32 sums cannot overflow:
    at most 32768 words of 0xFFFF plus a constant under 2**27. A full-size last row (a superpacket of whole
    segments, as TSO mostly makes them) is summed with the others; a shorter one on its own."""
    fix = pseudo_fix(f0, v6)
    k = n if final == first else n - 1
    rows = buf[:k, inner : inner + first]
    even = first & ~1
    s = rows[:, :even].view("<u2").sum(axis=1, dtype=np.uint32)
    if first & 1:  # the odd last byte, as the low byte of a little-endian word
        s += rows[:, even]
    s += (fix if v6 else fix + first) * 256
    if np.count_nonzero(np.remainder(s, M, out=s)):
        return False
    if not v6:
        # Full rows repeat row 0's IPv4 header but for id and checksum (coalesce_run checked that first, and
        # last_row_flags for the last row), so each sums to row 0's other words plus its own two.
        other = sum(_IP4_LE.unpack_from(f0)) - _H_LE.unpack_from(f0, h.IPV4_ID)[0]
        other -= _H_LE.unpack_from(f0, h.IPV4_CSUM)[0]
        cols = buf[:k, inner : inner + h.IPV4_MIN_HLEN].view("<u2")
        ip = np.add(cols[:, h.IPV4_ID // 2], cols[:, h.IPV4_CSUM // 2], dtype=np.uint32)
        ip += other
        if np.count_nonzero(np.remainder(ip, M, out=ip)):
            return False
        if k < n and sum(_IP4_LE.unpack(buf[n - 1, inner : inner + h.IPV4_MIN_HLEN].tobytes())) % M:
            return False
    return k == n or row_sum_ok(buf[n - 1, inner:], final, fix if v6 else fix + final)


def _build(
    buf: np.ndarray, n: int, inner: int, hl: int, l3: int, gso: int, last: int, last_flags: int, v6: bool
) -> memoryview:
    """Row 0's headers and every payload, in one new buffer behind a virtio header."""
    v = VNET_HDR_LEN
    total = hl + (n - 1) * gso + last
    dst = np.empty(v + total, np.uint8)
    dst[v : v + hl] = buf[0, inner : inner + hl]
    full = n if last == gso else n - 1  # a full-size last row goes with the others
    end = v + hl + full * gso
    dst[v + hl : end].reshape(full, gso)[:] = buf[:full, inner + hl : inner + hl + gso]
    if full < n:
        dst[end:] = buf[n - 1, inner + hl : inner + hl + last]
    mv = memoryview(dst)
    finish_superpacket(mv, v6=v6, hl=hl, l3=l3, gso=gso, total=total, flags=last_flags)
    return mv


def finish_superpacket(
    mv: memoryview, *, v6: bool, hl: int, l3: int, gso: int, total: int, flags: int
) -> None:
    """Patch a merged superpacket (`mv`: virtio header + packet; row 0's headers in place) to its own
    length, IPv4 header checksum, the last segment's flags and a NEEDS_CSUM TCP checksum, and write the
    virtio header that asks the kernel to segment it in gso-byte pieces."""
    v = VNET_HDR_LEN
    pseudo = set_ip_length(mv, v6=v6, total=total)
    mv[v + l3 + h.TCP_FLAGS] = flags
    # NEEDS_CSUM: the field holds the folded pseudo-header sum, not complemented; the kernel finishes it.
    _H.pack_into(mv, v + l3 + h.TCP_CSUM, (pseudo + h.IPPROTO_TCP + total - l3 - 1) % M + 1)
    kind = VIRTIO_NET_HDR_GSO_TCPV6 if v6 else VIRTIO_NET_HDR_GSO_TCPV4
    VNET_HDR_STRUCT.pack_into(mv, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, kind, hl, gso, l3, h.TCP_CSUM)


def set_ip_length(mv: memoryview, *, v6: bool, total: int) -> int:
    """A merged packet's own IP length (and IPv4 header checksum), behind the virtio header in `mv`; returns
    the sum of its addresses, the pseudo-header's part that every segment shares."""
    v = VNET_HDR_LEN
    if v6:
        _H.pack_into(mv, v + h.IPV6_PAYLOAD_LEN, total - h.IPV6_HLEN)
        return sum(_ADDR6.unpack_from(mv, v + h.IPV6_SRC))
    _H.pack_into(mv, v + h.IPV4_TOTAL_LEN, total)
    _H.pack_into(mv, v + h.IPV4_CSUM, 0)
    _H.pack_into(mv, v + h.IPV4_CSUM, M - 1 - (sum(_IP4.unpack_from(mv, v)) - 1) % M)
    return sum(_ADDR4.unpack_from(mv, v + h.IPV4_SRC))
