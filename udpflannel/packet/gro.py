"""GRO in userspace: coalesce consecutive TCP segments of one flow into superpackets for one TUN write each.

Rules (spec/fastpath.md "write (GRO)", as the kernel's tcp_gro_receive): same addresses, ports, ACK number,
TCP options, TOS/TTL/DF (IPv6: traffic class, flow label, hop limit); flags exactly ACK, the last one may be
ACK|PSH; adjacent sequence numbers; every segment but the last exactly as long as the first; verified L4
checksums (the kernel trusts a NEEDS_CSUM packet, so a corrupt segment must not hide inside one); at most
64 KiB. The head row's headers are patched in place and the virtio_net_hdr is written into its headroom;
the other rows' payloads are gathered by writev, so nothing is copied. Everything else gets a zero header."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import finish, fold, inet_sum_rows, pseudo_sum_v4, pseudo_sum_v6
from udpflannel.packet.parse import IpFields, ip_fields, validate_ip
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR_DTYPE,
    VNET_HDR_LEN,
    ZERO_VNET_HDR,
)

Iovecs = tuple[memoryview | bytes, ...]
_U64 = np.uint64
_ACK, _ACK_PSH = h.TCP_ACK_FLAG, h.TCP_ACK_FLAG | h.TCP_PSH
# Bytes of the IPv4 / IPv6 header that must be equal for two segments to join (length, id, checksum and
# the fragment offset are not compared; fragments never join).
_V4_SAME = np.r_[
    h.IPV4_VER_IHL : h.IPV4_TOTAL_LEN, h.IPV4_FRAG, h.IPV4_TTL : h.IPV4_CSUM, h.IPV4_SRC : h.IPV4_DST + 4
]
_V6_SAME = np.r_[h.IPV6_VER_TC_FLOW : h.IPV6_PAYLOAD_LEN, h.IPV6_NEXT_HDR : h.IPV6_DST + 16]
# TCP bytes that must be equal: ports, ACK number, data offset (options are compared separately).
_TCP_SAME = np.r_[h.TCP_SPORT : h.TCP_SEQ, h.TCP_ACK : h.TCP_FLAGS]


def _tcp_head(batch: PacketBatch, l3len: np.ndarray) -> np.ndarray:
    """uint8 [n, 60]: the TCP header (with options) of every row, zero past the packet."""
    n, off = batch.n, batch.offset
    cols = off + l3len[:, None] + np.arange(h.TCP_MAX_HLEN)
    past = cols >= off + batch.lengths[:n, None]
    tcp = batch.buf[np.arange(n)[:, None], np.minimum(cols, batch.stride - 1)]
    tcp[past] = 0
    return tcp


def coalesce(
    batch: PacketBatch, codes: np.ndarray | None = None, *, vnet: bool = True, gro: bool = True
) -> list[Iovecs]:
    """Write-ready packets for the TUN device: one tuple of buffers per write (os.writev), rows with a
    non-zero drop code left out. With vnet, each write starts with a virtio_net_hdr; with gro, runs of
    segments are merged. `codes` must come from validate_ip(..., l4_checksum=True); computed if None."""
    n = batch.n
    if n == 0:
        return []
    f = ip_fields(batch)
    if codes is None:
        codes = validate_ip(batch, l4_checksum=True, fields=f)
    keep = codes == 0
    if not vnet:
        return [(v,) for v, k in zip(batch.views(), keep.tolist(), strict=True) if k]
    rows = _tcp_rows(batch, f, keep)
    join = _can_join(f, rows) if gro else np.zeros(n, bool)
    return _emit(batch, f, keep, join, rows)


@dataclass
class _TcpRows:
    """Per-row TCP facts for rows that may join a run (`ok`); meaningless elsewhere."""

    ok: np.ndarray  # kept, TCP, plain IP header (no IPv4 options, no IPv6 extension headers), has payload
    th: np.ndarray  # uint8 [n, 60] TCP header with options
    hlen: np.ndarray  # IP + TCP header length
    plen: np.ndarray  # TCP payload length
    flags: np.ndarray
    seq: np.ndarray  # int64


def _tcp_rows(batch: PacketBatch, f: IpFields, keep: np.ndarray) -> _TcpRows:
    v4 = f.version == 4
    plain_ip = (v4 & (f.l3len == h.IPV4_MIN_HLEN) & ~f.is_fragment) | (
        (f.version == 6) & (f.l3len == h.IPV6_HLEN)
    )
    th = _tcp_head(batch, f.l3len)
    doff = (th[:, h.TCP_DOFF] >> 4).astype(np.int32) * 4
    th[np.arange(h.TCP_MAX_HLEN) >= doff[:, None]] = 0  # payload bytes are not options
    plen = f.ip_len - f.l3len - doff
    ok = keep & plain_ip & (f.proto == h.IPPROTO_TCP) & (doff >= h.TCP_MIN_HLEN) & (plen > 0)
    seq = th[:, h.TCP_SEQ : h.TCP_SEQ + 4].copy().view(">u4")[:, 0].astype(np.int64)
    return _TcpRows(ok, th, f.l3len + doff, plen, th[:, h.TCP_FLAGS], seq)


def _can_join(f: IpFields, t: _TcpRows) -> np.ndarray:
    """join[i]: row i may continue the run of row i-1 (run sizes and the 64 KiB limit are applied later)."""
    n = len(t.ok)
    join = np.zeros(n, bool)
    if n < 2 or np.count_nonzero(t.ok) < 2:
        return join
    v4 = f.version == 4
    same_ip = np.where(
        v4[1:],
        (f.head[1:, _V4_SAME] == f.head[:-1, _V4_SAME]).all(axis=1),
        (f.head[1:, _V6_SAME] == f.head[:-1, _V6_SAME]).all(axis=1),
    )
    # Options: the whole area past the fixed header, zero past each header's end, so unequal doff differs.
    same_tcp = (t.th[1:, _TCP_SAME] == t.th[:-1, _TCP_SAME]).all(axis=1) & (
        t.th[1:, h.TCP_MIN_HLEN :] == t.th[:-1, h.TCP_MIN_HLEN :]
    ).all(axis=1)
    join[1:] = (
        t.ok[1:]
        & t.ok[:-1]
        & (f.version[1:] == f.version[:-1])
        & same_ip
        & same_tcp
        & (t.flags[:-1] == _ACK)
        & ((t.flags[1:] == _ACK) | (t.flags[1:] == _ACK_PSH))
        & (t.seq[1:] == (t.seq[:-1] + t.plen[:-1]) % (1 << 32))
        & (t.plen[1:] <= t.plen[:-1])
    )
    return join


def _groups(join: np.ndarray, keep: np.ndarray, plen: np.ndarray, hlen: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) row of every output packet, in row order. A run is cut after a short segment and
    where the packet would pass 64 KiB. One Python step per output packet, not per row."""
    n = len(join)
    breaks = [*np.flatnonzero(~join).tolist(), n]
    out: list[tuple[int, int]] = []
    for a, nxt in itertools.pairwise(breaks):
        if not keep[a]:
            continue
        b = nxt - 1
        cur = a
        while cur <= b:
            if cur == b:
                out.append((cur, cur))
                break
            gso = int(plen[cur])
            short = np.flatnonzero(plen[cur + 1 : b + 1] != gso)
            end = b if short.size == 0 else cur + 1 + int(short[0])
            if int(hlen[cur]) + int(plen[cur : end + 1].sum()) > h.IP_MAXPACKET:
                # Only full segments fit before the short one would: cut after as many as fit.
                end = cur + max(1, (h.IP_MAXPACKET - int(hlen[cur])) // gso) - 1
            out.append((cur, end))
            cur = end + 1
    return out


def _emit(batch: PacketBatch, f: IpFields, keep: np.ndarray, join: np.ndarray, t: _TcpRows) -> list[Iovecs]:
    off, stride = batch.offset, batch.stride
    groups = _groups(join, keep, t.plen, t.hlen)
    if not groups:
        return []
    ga = np.array(groups, np.int64).reshape(-1, 2)
    merged = ga[ga[:, 0] != ga[:, 1]]
    singles = ga[ga[:, 0] == ga[:, 1], 0]
    in_place = off >= VNET_HDR_LEN
    if in_place and singles.size:
        batch.buf[singles, off - VNET_HDR_LEN : off] = 0
    vnet_bytes = _patch_heads(batch, f, t, merged[:, 0], merged[:, 1]) if merged.size else None

    lengths = batch.lengths.tolist()
    hlen = t.hlen.tolist()
    flat = memoryview(batch.buf.reshape(-1)) if batch.buf.flags.c_contiguous else None
    start = off - VNET_HDR_LEN if in_place else off

    def row(i: int, a: int) -> memoryview:
        if flat is not None:
            return flat[i * stride + a : i * stride + off + lengths[i]]
        return batch.buf[i, a : off + lengths[i]].data

    out: list[Iovecs] = []
    m = 0
    for a, b in groups:
        if a == b:
            out.append((row(a, start),) if in_place else (ZERO_VNET_HDR, row(a, start)))
            continue
        first = (row(a, start),) if in_place else (vnet_bytes[m], row(a, start))  # type: ignore[index]
        m += 1
        out.append(first + tuple(row(i, off + hlen[i]) for i in range(a + 1, b + 1)))
    return out


def _patch_heads(
    batch: PacketBatch, f: IpFields, t: _TcpRows, heads: np.ndarray, tails: np.ndarray
) -> list[bytes]:
    """Turn each head row into the superpacket's header: IP length (and IPv4 checksum), the last
    segment's flags, the pseudo-header sum in the TCP checksum field, and its virtio_net_hdr."""
    off, buf = batch.offset, batch.buf
    csum = np.cumsum(np.r_[0, t.plen])
    payload = csum[tails + 1] - csum[heads]
    l3 = f.l3len[heads]
    hlen = t.hlen[heads]
    v4 = f.version[heads] == 4
    total = hlen + payload
    be = total.astype(">u2").view(np.uint8).reshape(-1, 2)
    be6 = (total - h.IPV6_HLEN).astype(">u2").view(np.uint8).reshape(-1, 2)
    h4, h6 = heads[v4], heads[~v4]
    buf[h4, off + h.IPV4_TOTAL_LEN] = be[v4, 0]
    buf[h4, off + h.IPV4_TOTAL_LEN + 1] = be[v4, 1]
    buf[h6, off + h.IPV6_PAYLOAD_LEN] = be6[~v4, 0]
    buf[h6, off + h.IPV6_PAYLOAD_LEN + 1] = be6[~v4, 1]
    if h4.size:
        buf[h4, off + h.IPV4_CSUM : off + h.IPV4_CSUM + 2] = 0
        ip = buf[h4, off : off + h.IPV4_MIN_HLEN]
        c = finish(inet_sum_rows(ip, np.full(len(h4), h.IPV4_MIN_HLEN)))
        buf[h4, off + h.IPV4_CSUM] = (c >> _U64(8)).astype(np.uint8)
        buf[h4, off + h.IPV4_CSUM + 1] = (c & _U64(0xFF)).astype(np.uint8)
    col = off + l3
    buf[heads, col + h.TCP_FLAGS] = t.flags[tails]
    l4len = total - l3
    hd = f.head[heads]
    p4 = pseudo_sum_v4(
        hd[:, h.IPV4_SRC : h.IPV4_SRC + 4], hd[:, h.IPV4_DST : h.IPV4_DST + 4], h.IPPROTO_TCP, l4len
    )
    p6 = pseudo_sum_v6(
        hd[:, h.IPV6_SRC : h.IPV6_SRC + 16], hd[:, h.IPV6_DST : h.IPV6_DST + 16], h.IPPROTO_TCP, l4len
    )
    # NEEDS_CSUM: the field holds the folded pseudo-header sum, not complemented; the kernel finishes it.
    pseudo = fold(np.where(v4, p4, p6))
    buf[heads, col + h.TCP_CSUM] = (pseudo >> _U64(8)).astype(np.uint8)
    buf[heads, col + h.TCP_CSUM + 1] = (pseudo & _U64(0xFF)).astype(np.uint8)
    vh = np.zeros(len(heads), VNET_HDR_DTYPE)
    vh["flags"] = VIRTIO_NET_HDR_F_NEEDS_CSUM
    vh["gso_type"] = np.where(v4, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6)
    vh["hdr_len"] = hlen
    vh["gso_size"] = t.plen[heads]
    vh["csum_start"] = l3
    vh["csum_offset"] = h.TCP_CSUM
    raw = vh.view(np.uint8).reshape(-1, VNET_HDR_LEN)
    if off >= VNET_HDR_LEN:
        buf[heads, off - VNET_HDR_LEN : off] = raw
        return []
    return [r.tobytes() for r in raw]
