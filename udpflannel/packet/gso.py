"""GSO in userspace: split one TUN superpacket (TCP v4/v6 or UDP_L4) into wire-sized packets, as a batch.

Follows the kernel's tcp_gso_segment / __udp_gso_segment (spec/fastpath.md "split"): every segment gets a
copy of the IP and L4 headers, then per-row patches (IPv4 id += i, lengths, TCP seq, FIN/PSH only on the
last segment, CWR only on the first) and full checksums, all as array operations over the whole batch.
A packet without GSO comes back as a batch of one, its partial checksum finished if NEEDS_CSUM is set.
Input is never trusted: anything inconsistent gives an empty batch whose `drop` says why."""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import TAILROOM, PacketBatch, round_up
from udpflannel.packet.checksum import M, finish, finish_udp, inet_sum
from udpflannel.packet.drops import DropReason
from udpflannel.packet.headers import rows_view
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
    VnetHdr,
)

# A superpacket is at most 64 KiB; with a tiny gso_size it could become thousands of rows. Refuse those.
MAX_SEGMENTS = 1024

BytesLike = bytes | bytearray | memoryview | np.ndarray


def _as_u8(data: BytesLike) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, np.uint8)


def _be16(col: np.ndarray) -> np.ndarray:
    """A [n, 2] uint8 column pair as a writable big-endian uint16 view of shape [n]."""
    return col.view(">u2")[:, 0]


def split_superpacket(
    data: BytesLike, vnet_hdr: VnetHdr | BytesLike | None, headroom: int, *, packed: bool = False
) -> PacketBatch:
    """Split `data` (an IP packet as read from TUN, without its virtio header) into a batch of packets.

    With packed, GSO superpackets come back with rows laid end to end (stride = headroom + the full
    segment length, every row but the last exactly that long): after the caller writes its `headroom`
    bytes of encapsulation in front of each row, the whole batch is one contiguous buffer of equal-size
    datagrams (`packed_payload`), ready for one UDP_SEGMENT send with segment size `stride`."""
    pkt = _as_u8(data)
    if vnet_hdr is None:
        hdr = VnetHdr()
    elif isinstance(vnet_hdr, VnetHdr):
        hdr = vnet_hdr
    elif len(vnet_hdr) < 10:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    else:
        hdr = VnetHdr.decode(bytes(vnet_hdr[:10]))
    kind = hdr.gso_kind
    if len(pkt) == 0:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    if kind == VIRTIO_NET_HDR_GSO_NONE:
        return _single(pkt, hdr, headroom)
    if kind in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6):
        return _split(pkt, hdr, headroom, tcp=True, packed=packed)
    if kind == VIRTIO_NET_HDR_GSO_UDP_L4:
        return _split(pkt, hdr, headroom, tcp=False, packed=packed)
    return PacketBatch.refused(DropReason.UNSUPPORTED_GSO, headroom)


def _single(pkt: np.ndarray, hdr: VnetHdr, headroom: int) -> PacketBatch:
    """One packet, copied into a batch of one; a partial checksum (NEEDS_CSUM) is finished in place."""
    n = len(pkt)
    batch = PacketBatch(
        np.empty((1, round_up(headroom + n + TAILROOM, 8)), np.uint8), np.array([n], np.int32), headroom, 1
    )
    row = batch.buf[0, headroom : headroom + n]
    row[:] = pkt
    if hdr.needs_csum:
        start, field = hdr.csum_start, hdr.csum_start + hdr.csum_offset
        if field + 2 > n or hdr.csum_offset not in (h.TCP_CSUM, h.UDP_CSUM):
            return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
        # The field already holds the pseudo-header sum: the sum over [csum_start, end) includes it.
        s = inet_sum(row[start:])
        c = int(finish_udp(s) if hdr.csum_offset == h.UDP_CSUM else finish(s))
        row[field : field + 2] = (c >> 8, c & 0xFF)
    return batch


def packed_payload(batch: PacketBatch) -> memoryview:
    """The datagrams of a packed batch (split_superpacket(..., packed=True)) as one buffer: row i's bytes
    from column 0 to its packet's end, rows back to back."""
    stride = batch.stride
    end = (batch.n - 1) * stride + batch.offset + int(batch.lengths[batch.n - 1])
    return memoryview(batch.buf.reshape(-1))[:end]


def _split(pkt: np.ndarray, hdr: VnetHdr, headroom: int, *, tcp: bool, packed: bool = False) -> PacketBatch:
    total = len(pkt)
    l3 = hdr.csum_start  # where L4 starts; hdr_len is not trusted (spec/fastpath.md), csum_start is checked
    version = int(pkt[0]) >> 4
    v4 = version == 4
    if tcp and (hdr.gso_kind == VIRTIO_NET_HDR_GSO_TCPV4) != v4:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    if v4:
        if l3 != (int(pkt[0]) & 0xF) * 4 or l3 < h.IPV4_MIN_HLEN or total < l3:
            return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
        proto = int(pkt[h.IPV4_PROTO])
    elif version == 6:
        # Extension headers come in multiples of 8 bytes (RFC 8200 4.1): an odd csum_start is nonsense.
        if l3 < h.IPV6_HLEN or (l3 - h.IPV6_HLEN) % 8 or total < l3:
            return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
        # Extension headers between the fixed header and L4 are copied as they are; only the common case
        # (none) lets us check the protocol here.
        proto = int(pkt[h.IPV6_NEXT_HDR]) if l3 == h.IPV6_HLEN else (h.IPPROTO_TCP if tcp else h.IPPROTO_UDP)
    else:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    want_proto, want_off = (h.IPPROTO_TCP, h.TCP_CSUM) if tcp else (h.IPPROTO_UDP, h.UDP_CSUM)
    if proto != want_proto or hdr.csum_offset != want_off:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    if tcp:
        if total < l3 + h.TCP_MIN_HLEN:
            return PacketBatch.refused(DropReason.TRUNCATED, headroom)
        l4_len = (int(pkt[l3 + h.TCP_DOFF]) >> 4) * 4
        if l4_len < h.TCP_MIN_HLEN:
            return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    else:
        l4_len = h.UDP_HLEN
    hlen = l3 + l4_len
    mss = hdr.gso_size
    payload = total - hlen
    if payload < 0:
        return PacketBatch.refused(DropReason.TRUNCATED, headroom)
    if mss == 0:
        return PacketBatch.refused(DropReason.BAD_HEADER, headroom)
    k = max(1, -(-payload // mss))
    if k > MAX_SEGMENTS:
        return PacketBatch.refused(DropReason.TOO_BIG, headroom)
    return _segment(pkt, headroom, l3, hlen, mss, k, v4=v4, tcp=tcp, proto=proto, packed=packed)


@lru_cache(maxsize=32)
def header_words(hlen: int) -> struct.Struct:
    """A header of hlen bytes as big-endian 16-bit words."""
    return struct.Struct(f"!{hlen // 2}H")


def payload_sums(buf: np.ndarray, p0: int, mss: int) -> np.ndarray:
    """Every row's sum of the mss payload bytes from column p0 (a shorter last payload zero-padded to mss),
    as little-endian 16-bit words times 256: network order, mod 0xFFFF, unfolded (int64). A uint32 sum
    cannot overflow (at most 32767 words of 0xFFFF) and costs less than a widening one."""
    even = mss & ~1
    s = buf[:, p0 : p0 + even].view("<u2").sum(axis=1, dtype=np.uint32)
    if mss & 1:
        s += buf[:, p0 + even]  # an odd last byte: a word's low byte here, its high byte in network order
    return np.multiply(s, 256, dtype=np.int64)


def _segment(
    pkt: np.ndarray,
    off: int,
    l3: int,
    hlen: int,
    mss: int,
    k: int,
    *,
    v4: bool,
    tcp: bool,
    proto: int,
    packed: bool = False,
) -> PacketBatch:
    """The split itself, for a superpacket already checked: replicate, patch per-row fields, checksum.

    Only the last row is shorter and only the first and last rows have other TCP flags, so every per-row
    sum is a shared constant (computed once, in plain Python, from the template header) plus the row's own
    fields, with scalar fix-ups for those two rows. Checksum arithmetic is mod 0xFFFF (checksum.py)."""
    raw = pkt[:hlen].tobytes()
    hw = header_words(hlen).unpack(raw)  # the template header as 16-bit words, for shared sums
    t0 = l3 // 2  # first L4 word
    full = k - 1
    last = len(pkt) - hlen - full * mss
    p0 = off + hlen
    # Packed: rows end to end, so the columns after a payload are the next row's headroom.
    stride = off + hlen + mss if packed else round_up(off + hlen + mss + TAILROOM, 8)
    buf = np.empty((k, stride), np.uint8)
    buf[full, p0 + last : p0 + mss] = 0  # zeros do not change a sum, so every row sums the same columns
    buf[:, off:p0] = pkt[:hlen]
    buf[:full, p0 : p0 + mss] = pkt[hlen : hlen + full * mss].reshape(full, mss)
    buf[full, p0 : p0 + last] = pkt[hlen + full * mss :]
    lengths = np.empty(k, np.int32)
    lengths.fill(hlen + mss)  # (np.full costs a microsecond more)
    lengths[-1] = hlen + last
    short = last - mss  # how much shorter the last row is (0 or negative)
    ar = np.arange(k, dtype=np.int64)

    if v4:
        ip = rows_view(buf, off, h.IPV4_HDR)
        id0 = int.from_bytes(raw[h.IPV4_ID : h.IPV4_ID + 2], "big")
        ip["total_len"] = lengths
        ip["id"] = (id0 + ar) & 0xFFFF
        # The header minus total length, id and checksum is shared; id wraps at 16 bits, and 0x10000 is
        # 1 mod 0xFFFF, so the wrapped id sums like the unwrapped one minus 1.
        shared = sum(hw[:t0]) - hw[h.IPV4_TOTAL_LEN // 2] - hw[h.IPV4_ID // 2] - hw[h.IPV4_CSUM // 2]
        s = ar + (shared + hlen + mss + id0 - 1)  # minus 1: the offset of checksum.finish_positive
        if 0x10000 - id0 < k:
            s[0x10000 - id0 :] -= 1
        s[-1] += short
        ip["csum"] = np.subtract(M - 1, np.remainder(s, M, out=s), out=s)
        pseudo = sum(hw[h.IPV4_SRC // 2 : (h.IPV4_DST + 4) // 2]) + proto
    else:
        rows_view(buf, off, h.IPV6_HDR)["payload_len"] = lengths - h.IPV6_HLEN
        pseudo = sum(hw[h.IPV6_SRC // 2 : (h.IPV6_DST + 16) // 2]) + proto

    pay = payload_sums(buf, p0, mss)
    l4len = hlen - l3 + mss
    if tcp:
        t = rows_view(buf, off + l3, h.TCP_HDR)
        seq0 = int.from_bytes(raw[l3 + h.TCP_SEQ : l3 + h.TCP_SEQ + 4], "big")
        seq = (seq0 + mss * ar) & 0xFFFFFFFF
        t["seq"] = seq
        f0 = raw[l3 + h.TCP_FLAGS]
        mid = f0 & ~(h.TCP_FIN | h.TCP_PSH | h.TCP_CWR) & 0xFF
        first = f0 & ~(h.TCP_FIN | h.TCP_PSH) & 0xFF  # CWR only on the first segment
        final = f0 if k == 1 else f0 & ~h.TCP_CWR & 0xFF  # FIN and PSH only on the last
        flags = t["flags"]
        flags[:] = mid
        flags[0] = first
        flags[-1] = final
        # the TCP header minus its per-row words (seq, flags, checksum); a 32-bit seq sums like its two
        # 16-bit halves because 0x10000 is 1 mod 0xFFFF
        base = sum(hw[t0:]) - hw[t0 + h.TCP_SEQ // 2] - hw[t0 + h.TCP_SEQ // 2 + 1]
        base -= f0 + hw[t0 + h.TCP_CSUM // 2]
        s = seq + pay + (pseudo + base + l4len + mid - 1)
        if k > 1:
            s[0] += first - mid
        s[-1] += final - mid + short
        t["csum"] = np.subtract(M - 1, np.remainder(s, M, out=s), out=s)
    else:
        u = rows_view(buf, off + l3, h.UDP_HDR)
        u["len"] = lengths - l3
        base = sum(hw[t0:]) - hw[t0 + h.UDP_LEN // 2] - hw[t0 + h.UDP_CSUM // 2]
        # the UDP length appears twice: in the pseudo-header and in the header itself
        s = pay + (pseudo + base + 2 * l4len)
        s[-1] += 2 * short
        u["csum"] = finish_udp(s)
    return PacketBatch(buf, lengths, off, k)
