"""GSO in userspace: split one TUN superpacket (TCP v4/v6 or UDP_L4) into wire-sized packets, as a batch.

Follows the kernel's tcp_gso_segment / __udp_gso_segment (spec/fastpath.md "split"): every segment gets a
copy of the IP and L4 headers, then per-row patches (IPv4 id += i, lengths, TCP seq, FIN/PSH only on the
last segment, CWR only on the first) and full checksums, all as array operations over the whole batch.
A packet without GSO comes back as a batch of one, its partial checksum finished if NEEDS_CSUM is set.
Input is never trusted: anything inconsistent gives an empty batch whose `drop` says why."""

from __future__ import annotations

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import TAILROOM, PacketBatch, round_up
from udpflannel.packet.checksum import bytes_sum, finish, finish_positive, finish_udp, inet_sum
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


def split_superpacket(data: BytesLike, vnet_hdr: VnetHdr | BytesLike | None, headroom: int) -> PacketBatch:
    """Split `data` (an IP packet as read from TUN, without its virtio header) into a batch of packets."""
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
        return _split(pkt, hdr, headroom, tcp=True)
    if kind == VIRTIO_NET_HDR_GSO_UDP_L4:
        return _split(pkt, hdr, headroom, tcp=False)
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


def _split(pkt: np.ndarray, hdr: VnetHdr, headroom: int, *, tcp: bool) -> PacketBatch:
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
        if l3 < h.IPV6_HLEN or total < l3:
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
    return _segment(pkt, headroom, l3, hlen, mss, k, v4=v4, tcp=tcp, proto=proto)


def _segment(
    pkt: np.ndarray, off: int, l3: int, hlen: int, mss: int, k: int, *, v4: bool, tcp: bool, proto: int
) -> PacketBatch:
    """The split itself, for a superpacket already checked: replicate, patch per-row fields, checksum."""
    raw = pkt[:hlen].tobytes()
    payload = len(pkt) - hlen
    full = k - 1
    last = payload - full * mss
    stride = round_up(off + hlen + mss + TAILROOM, 8)
    buf = np.empty((k, stride), np.uint8)
    buf[:, off : off + hlen] = pkt[:hlen]
    p0 = off + hlen
    body = pkt[hlen : hlen + full * mss].reshape(full, mss)
    buf[:full, p0 : p0 + mss] = body
    buf[full, p0 : p0 + last] = pkt[hlen + full * mss :]
    lengths = np.full(k, hlen + mss, np.int32)
    lengths[-1] = hlen + last
    ar = np.arange(k, dtype=np.int64)
    l4len = lengths - l3

    # Sums of everything the rows share, in plain Python over the template header, once per superpacket.
    if v4:
        ip = rows_view(buf, off, h.IPV4_HDR)
        ip_id = (int.from_bytes(raw[h.IPV4_ID : h.IPV4_ID + 2], "big") + ar) & 0xFFFF
        ip["total_len"] = lengths
        ip["id"] = ip_id
        # total_len, id and checksum are per row; the rest of the header is summed once.
        ip_base = bytes_sum(raw[:l3]) - bytes_sum(raw[h.IPV4_TOTAL_LEN : h.IPV4_ID + 2])
        ip_base -= bytes_sum(raw[h.IPV4_CSUM : h.IPV4_CSUM + 2])
        ip["csum"] = finish_positive(ip_base + lengths + ip_id)
        pseudo = bytes_sum(raw[h.IPV4_SRC : h.IPV4_DST + 4]) + proto
    else:
        rows_view(buf, off, h.IPV6_HDR)["payload_len"] = lengths - h.IPV6_HLEN
        pseudo = bytes_sum(raw[h.IPV6_SRC : h.IPV6_DST + 16]) + proto

    # L4 checksum = pseudo-header + header words + payload, each part summed where it is cheapest.
    pay = _payload_sums(body, mss, pkt[hlen + full * mss :])
    if tcp:
        t = rows_view(buf, off + l3, h.TCP_HDR)
        seq = (int.from_bytes(raw[l3 + h.TCP_SEQ : l3 + h.TCP_SEQ + 4], "big") + mss * ar) & 0xFFFFFFFF
        flags0 = raw[l3 + h.TCP_FLAGS]
        flags = np.full(k, flags0 & ~(h.TCP_FIN | h.TCP_PSH | h.TCP_CWR), np.int64)
        flags[0] = flags0 & ~(h.TCP_FIN | h.TCP_PSH)  # CWR only on the first segment
        flags[-1] = (flags0 & ~h.TCP_CWR) if k > 1 else flags0  # FIN/PSH only on the last
        t["seq"] = seq
        t["flags"] = flags
        # the TCP header minus its per-row words (seq, data offset + flags, checksum)
        base = bytes_sum(raw[l3:hlen]) - bytes_sum(raw[l3 + h.TCP_SEQ : l3 + h.TCP_SEQ + 4])
        base -= bytes_sum(raw[l3 + h.TCP_DOFF : l3 + h.TCP_FLAGS + 1]) + bytes_sum(
            raw[l3 + h.TCP_CSUM : l3 + 18]
        )
        row = (seq >> 16) + (seq & 0xFFFF) + (raw[l3 + h.TCP_DOFF] << 8) + flags
        t["csum"] = finish_positive(pseudo + base + l4len + row + pay)
    else:
        u = rows_view(buf, off + l3, h.UDP_HDR)
        u["len"] = l4len
        base = bytes_sum(raw[l3:hlen]) - bytes_sum(raw[l3 + h.UDP_LEN : l3 + h.UDP_CSUM + 2])
        # the UDP length appears twice: in the pseudo-header and in the header itself
        u["csum"] = finish_udp(pseudo + base + 2 * l4len + pay)
    return PacketBatch(buf, lengths, off, k)


def _payload_sums(body: np.ndarray, mss: int, tail: np.ndarray) -> np.ndarray:
    """Unfolded sums (checksum.py domain) of each full payload row of `body` and of the last, short one."""
    full = body.shape[0]
    q, r = divmod(mss, 4)
    s = np.empty(full + 1, np.int64)
    if full:
        acc = (
            body[:, : q * 4].view("<u4").sum(axis=1, dtype=np.int64) * 256 if q else np.zeros(full, np.int64)
        )
        if r:
            # words are 16-bit pairs from each row's start: the 1-3 trailing bytes form a last, padded word
            t = body[:, q * 4 :].astype(np.int64)
            acc += (t[:, 0] << 8) + (t[:, 1] if r > 1 else 0) + ((t[:, 2] << 8) if r > 2 else 0)
        s[:full] = acc
    s[full] = _be_sum(tail)
    return s


def _be_sum(a: np.ndarray) -> int:
    """Sum of the big-endian 16-bit words of one uint8 array (zero-padded to even length)."""
    if len(a) % 2:
        a = np.concatenate((a, np.zeros(1, np.uint8)))
    return int(a.view(">u2").sum(dtype=np.int64))
