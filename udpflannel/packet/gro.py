"""GRO in userspace: coalesce consecutive TCP segments of one flow into superpackets for one TUN write each.

Rules (spec/fastpath.md "write (GRO)", as the kernel's tcp_gro_receive): same addresses, ports, ACK number,
TCP options, TOS/TTL/DF (IPv6: traffic class, flow label, hop limit); flags exactly ACK, the last one may be
ACK|PSH; adjacent sequence numbers; every segment but the last exactly as long as the first; verified L4
checksums (the kernel trusts a NEEDS_CSUM packet, so a corrupt segment must not hide inside one); at most
64 KiB. A merged run is assembled with one copy of its payloads; everything else is written where it
lies, with a zero virtio header in its headroom."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import M, sum_rows_raw
from udpflannel.packet.gro_run import coalesce_run, finish_superpacket
from udpflannel.packet.gro_udp import coalesce_udp
from udpflannel.packet.parse import IpFields, ip_fields, readable, validate_ip
from udpflannel.packet.vnet import VNET_HDR_LEN, ZERO_VNET_HDR

Iovecs = tuple[memoryview | bytes, ...]
_ACK, _ACK_PSH = h.TCP_ACK_FLAG, h.TCP_ACK_FLAG | h.TCP_PSH
# Little-endian uint32 words of the first 40 bytes of an IP header, masked to what must be equal for two
# segments to join: IPv4 version/IHL/TOS, flags/fragment word, TTL/protocol, addresses (not the length, id
# or checksum); IPv6 version/class/flow label, next header/hop limit, addresses (not the payload length).
_V4_KEY = np.array([0x0000FFFF, 0xFFFF0000, 0x0000FFFF, ~0, ~0, 0, 0, 0, 0, 0], np.int64).astype(np.uint32)
_V6_KEY = np.array([~0, 0xFFFF0000, ~0, ~0, ~0, ~0, ~0, ~0, ~0, ~0], np.int64).astype(np.uint32)
# TCP words: ports, ACK number, data offset byte, options (seq, flags, window, checksum, urgent may differ).
_TCP_KEY = np.array([~0, 0, ~0, 0xFF] + [0] + [~0] * 10, np.int64).astype(np.uint32)


def coalesce(
    batch: PacketBatch,
    codes: np.ndarray | None = None,
    *,
    vnet: bool = True,
    gro: bool = True,
    fields: IpFields | None = None,
    uso: bool = False,
) -> list[Iovecs]:
    """Write-ready packets for the TUN device: one tuple of buffers per write (os.writev), rows with a
    non-zero drop code left out. With vnet, each write starts with a virtio_net_hdr; with gro, runs of
    segments are merged; with uso too (the TUN takes UDP_L4 superpackets), a batch of one UDP flow's
    datagrams is one write (gro_udp). `codes` must come from validate_ip(..., l4_checksum=True); computed
    if None. `fields`: ip_fields(batch) when the caller has it already (from validate_ip)."""
    n = batch.n
    if n == 0:
        return []
    verified = codes is not None and not np.count_nonzero(codes)
    if (codes is None or verified) and vnet and gro:
        run = coalesce_run(batch, verified=verified)
        if run is not None:
            return [(run,)]
        buf = readable(batch)
        first = buf[:, batch.offset]
        v6 = bool(first[0] >> 4 == 6)
        if (first == 0x45).all() if not v6 else ((first >> 4) == 6).all():
            train = _train(batch, buf, v6=v6, verified=verified)
            if train is not None:
                assert train.join is not None
                return _emit(batch, buf, _groups(train.join, train.ok, train.plen, train.hlen), train)
    f = fields or ip_fields(batch)
    if codes is None:
        codes = validate_ip(batch, l4_checksum=True, fields=f)
    keep = codes == 0
    if not vnet:
        return [(v,) for v, k in zip(batch.views(), keep.tolist(), strict=True) if k]
    if uso and gro and n > 1:
        run = coalesce_udp(batch, keep, f)
        if run is not None:
            return [(run,)]
    # Nothing to join without two TCP rows (e.g. a train of small UDP datagrams): every row on its own.
    if not gro or n == 1 or np.count_nonzero(keep & (f.proto == h.IPPROTO_TCP)) < 2:
        return _emit(batch, f.buf, [(i, i) for i in np.flatnonzero(keep).tolist()], None)
    t = _tcp_rows(batch, f, keep)
    join = _can_join(f, t)
    return _emit(batch, f.buf, _groups(join, keep, t.plen, t.hlen), t)


def coalesce_train(batch: PacketBatch) -> list[Iovecs] | None:
    """The common case of `coalesce` (vnet and gro on) alone: when every row is a sound, checksummed TCP
    segment of one flow, the write-ready packets, with every check validate_ip(l4_checksum=True) makes done
    on the way (so the caller need not validate first). None, with nothing changed, when any row is not:
    then validate and coalesce the general way."""
    if batch.n == 0:
        return []
    buf = readable(batch)
    first = buf[:, batch.offset]
    v6 = bool(first[0] >> 4 == 6)
    if not ((first == 0x45).all() if not v6 else ((first >> 4) == 6).all()):
        return None
    train = _train(batch, buf, v6=v6, verified=False)
    if train is None:
        return None
    assert train.join is not None
    return _emit(batch, buf, _groups(train.join, train.ok, train.plen, train.hlen), train)


@dataclass
class _TcpRows:
    """Per-row TCP facts; meaningful where `ok` (kept, TCP, plain IP header, payload present)."""

    ok: np.ndarray | None  # None: every row
    words: np.ndarray  # uint32 [n, 15]: the TCP header (options zeroed past the data offset), LE words
    hlen: np.ndarray | int  # IP + TCP header length (an int when every row shares it)
    plen: np.ndarray  # TCP payload length
    flags: np.ndarray
    seq: np.ndarray  # int64
    l3: np.ndarray | int  # IP header length
    v4: np.ndarray | bool
    join: np.ndarray | None = None  # set by the fast path, which decides joins in the same pass


# Big-endian 16-bit word columns of the IP + fixed TCP header that every segment of one flow shares.
# IPv4: version/IHL/TOS, flags/fragment, TTL/protocol, addresses; IPv6: version/class/flow label, next
# header/hop limit, addresses; then TCP ports, ACK number and data offset (0xF000 of its word).
_V4_TRAIN_MASK = np.zeros(20, np.int64)
_V4_TRAIN_MASK[[0, 3, 4, 6, 7, 8, 9, 10, 11, 14, 15]] = 0xFFFF
_V4_TRAIN_MASK[16] = 0xF000
_V6_TRAIN_MASK = np.zeros(30, np.int64)
_V6_TRAIN_MASK[[0, 1, 3, *range(4, 20), 20, 21, 24, 25]] = 0xFFFF
_V6_TRAIN_MASK[26] = 0xF000


def _train(batch: PacketBatch, buf: np.ndarray, *, v6: bool, verified: bool = False) -> _TcpRows | None:
    """The common case in one pass: every row a sound, unfragmented, unpadded TCP segment of one flow
    (IPv4 without options, or IPv6 without extension headers), with every checksum right (`verified`:
    validate_ip(l4_checksum=True) already said so). Returns None otherwise, and the general path (which
    judges each row) takes over; the result is the same either way."""
    n, off = batch.n, batch.offset
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    tw = l3 // 2  # the first TCP word
    a = buf[:, off : off + l3 + h.TCP_MIN_HLEN].view(">u2").astype(np.int64)  # the headers as 16-bit words
    a0 = a[0].tolist()
    hl = l3 + (a0[tw + 6] >> 12) * 4
    if hl < l3 + h.TCP_MIN_HLEN:
        return None
    if v6:
        if a0[h.IPV6_NEXT_HDR // 2] >> 8 != h.IPPROTO_TCP:
            return None
        ip_len = a[:, h.IPV6_PAYLOAD_LEN // 2] + h.IPV6_HLEN
        mask = _V6_TRAIN_MASK
    else:
        if a0[h.IPV4_PROTO // 2] & 0xFF != h.IPPROTO_TCP or a0[h.IPV4_FRAG // 2] & h.IPV4_MF_OFFSET_MASK:
            return None
        ip_len = a[:, h.IPV4_TOTAL_LEN // 2]
        mask = _V4_TRAIN_MASK
    plen = ip_len - hl
    # Every row carries row 0's flow key; lengths agree with the buffer; there is payload.
    if ((a ^ a[0]) & mask).any() or not (ip_len == batch.lengths).all() or int(plen.min()) <= 0:
        return None
    if hl > l3 + h.TCP_MIN_HLEN:
        opts = buf[:, off + l3 + h.TCP_MIN_HLEN : off + hl]
        if not (opts == opts[0]).all():
            return None
    if not verified:
        if not v6 and (a[:, :10].sum(axis=1) % M).any():  # RFC 791: a sound header sums to 0 mod 0xFFFF
            return None
        # TCP checksums: the whole packet's sum plus what turns it into pseudo-header + segment. IPv4:
        # its header adds 0 (mod 0xFFFF), add addresses, protocol, L4 length. IPv6: the header holds the
        # addresses and the payload length already; take out version/class/flow and next header/hop
        # limit, add the next header alone. Everything but the length is the same in every row.
        if v6:
            fix = 4 * M - a0[0] - a0[1] - a0[h.IPV6_NEXT_HDR // 2] + h.IPPROTO_TCP
            s = sum_rows_raw(buf[:, off:], ip_len) + fix
        else:
            fix = sum(a0[h.IPV4_SRC // 2 : (h.IPV4_DST + 4) // 2]) + h.IPPROTO_TCP - h.IPV4_MIN_HLEN
            s = sum_rows_raw(buf[:, off:], ip_len) + ip_len + fix
        if (s % M).any():
            return None
    flags = a[:, tw + 6] & 0xFF
    seq = (a[:, tw + 2] << 16) | a[:, tw + 3]
    join = np.zeros(n, bool)
    join[1:] = (
        (flags[:-1] == _ACK)
        & ((flags[1:] | h.TCP_PSH) == _ACK_PSH)  # exactly ACK or ACK|PSH
        & (((seq[1:] - seq[:-1] - plen[:-1]) & 0xFFFFFFFF) == 0)
        & (plen[1:] <= plen[:-1])
    )
    return _TcpRows(None, a, hl, plen, flags, seq, l3, not v6, join)


def _tcp_rows(batch: PacketBatch, f: IpFields, keep: np.ndarray) -> _TcpRows:
    n, off = batch.n, batch.offset
    if f.plain_v4:
        l3 = f.l3len
        ok = keep & (f.proto == h.IPPROTO_TCP) & ~f.is_fragment
    else:
        v4 = f.version == 4
        plain = (v4 & (f.l3len == h.IPV4_MIN_HLEN) & ~f.is_fragment) | (
            (f.version == 6) & (f.l3len == h.IPV6_HLEN)
        )
        ok = keep & plain & (f.proto == h.IPPROTO_TCP)
        l3 = np.where(ok, f.l3len, h.IPV4_MIN_HLEN)
    c0 = off + int(l3[0])
    doff_byte = f.buf[:, c0 + h.TCP_DOFF]
    if (l3 == l3[0]).all() and (doff_byte == doff_byte[0]).all():
        # One flow's segments: every TCP header sits at the same column with the same length, so the
        # header words are a view, no gather.
        hl = (int(doff_byte[0]) >> 4) * 4
        th = f.buf[:, c0 : c0 + max(hl, h.TCP_MIN_HLEN)]
        doff = np.full(n, hl, np.int32)
    else:
        th = f.buf[np.arange(n)[:, None], (off + l3)[:, None] + np.arange(h.TCP_MAX_HLEN)]
        doff = (th[:, h.TCP_DOFF] >> 4).astype(np.int32) * 4
        th[np.arange(h.TCP_MAX_HLEN) >= doff[:, None]] = 0  # payload bytes are not options
    plen = f.ip_len - l3 - doff
    ok &= (doff >= h.TCP_MIN_HLEN) & (plen > 0)
    seq = th[:, h.TCP_SEQ : h.TCP_SEQ + 4].view(">u4")[:, 0].astype(np.int64)
    return _TcpRows(ok, th.view("<u4"), l3 + doff, plen, th[:, h.TCP_FLAGS], seq, l3, f.version == 4)


def _can_join(f: IpFields, t: _TcpRows) -> np.ndarray:
    """join[i]: row i may continue the run of row i-1 (run sizes and the 64 KiB limit are applied later)."""
    n = len(t.ok)
    join = np.zeros(n, bool)
    if n < 2 or np.count_nonzero(t.ok) < 2:
        return join
    if f.plain_v4:
        ipw = f.buf[:, f.offset : f.offset + 20].view("<u4") & _V4_KEY[:5]
    else:
        key = np.where((f.version == 4)[:, None], _V4_KEY, _V6_KEY)
        ipw = f.buf[:, f.offset : f.offset + 40].view("<u4") & key
    tcpw = t.words & _TCP_KEY[: t.words.shape[1]]
    same = (ipw[1:] == ipw[:-1]).all(axis=1) & (tcpw[1:] == tcpw[:-1]).all(axis=1)
    join[1:] = (
        same
        & t.ok[1:]
        & t.ok[:-1]
        & (t.flags[:-1] == _ACK)
        & ((t.flags[1:] == _ACK) | (t.flags[1:] == _ACK_PSH))
        & (t.seq[1:] == (t.seq[:-1] + t.plen[:-1]) & 0xFFFFFFFF)
        & (t.plen[1:] <= t.plen[:-1])
    )
    return join


def _groups(
    join: np.ndarray, keep: np.ndarray | None, plen: np.ndarray, hlen: np.ndarray | int
) -> list[tuple[int, int]]:
    """(first, last) row of every output packet, in row order. A run is cut after a short segment and
    where the packet would pass 64 KiB. One Python step per output packet, not per row."""
    n = len(join)
    if join[1:].all():  # one run (a train from one flow): no need to look for its ends
        runs = [(0, n - 1)]
    else:
        starts = np.flatnonzero(~join)
        runs = list(zip(starts.tolist(), (np.append(starts[1:], n) - 1).tolist(), strict=True))
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if keep is not None and not keep[a]:
            continue
        cur = a
        while cur <= b:
            if cur == b:
                out.append((cur, cur))
                break
            gso = int(plen[cur])
            end = b
            if plen[b] != gso or plen[b - 1] != gso:  # sizes only fall within a run: find the first short one
                end = cur + 1 + int(np.flatnonzero(plen[cur + 1 : b + 1] != gso)[0])
            hl = _at(hlen, cur)
            if hl + gso * (end - cur) + int(plen[end]) > h.IP_MAXPACKET:
                # Only full segments fit before the short one would: cut after as many as fit.
                end = cur + max(1, (h.IP_MAXPACKET - hl) // gso) - 1
            out.append((cur, end))
            cur = end + 1
    return out


def _emit(
    batch: PacketBatch, src: np.ndarray, groups: list[tuple[int, int]], t: _TcpRows | None
) -> list[Iovecs]:
    """Single rows are written where they are (zero virtio header in their headroom); merged runs are
    assembled in a fresh buffer with one copy of their payloads (cheaper than one iovec per segment)."""
    off, stride = batch.offset, batch.stride
    in_place = off >= VNET_HDR_LEN
    lengths = batch.lengths.tolist()
    flat = memoryview(batch.buf.reshape(-1)) if batch.buf.flags.c_contiguous else None
    start = off - VNET_HDR_LEN if in_place else off
    out: list[Iovecs] = []
    singles: list[int] = []
    for a, b in groups:
        if a != b:
            assert t is not None
            out.append((_merge(batch, src, t, a, b),))
            continue
        singles.append(a)
        if flat is not None:
            v = flat[a * stride + start : a * stride + off + lengths[a]]
        else:
            v = batch.buf[a, start : off + lengths[a]].data
        out.append((v,) if in_place else (ZERO_VNET_HDR, v))
    if in_place and singles:
        batch.buf[singles, off - VNET_HDR_LEN : off] = 0
    return out


def _merge(batch: PacketBatch, src: np.ndarray, t: _TcpRows, a: int, b: int) -> memoryview:
    """Rows a..b as one new superpacket: virtio header, row a's headers (length, checksums and flags
    patched), every payload. All rows but b carry exactly gso bytes (the run rules guarantee it)."""
    off = batch.offset
    hl, l3, gso = _at(t.hlen, a), _at(t.l3, a), int(t.plen[a])
    last = int(t.plen[b])
    full = b - a
    total = hl + full * gso + last
    v = VNET_HDR_LEN
    dst = np.empty(v + total, np.uint8)
    dst[v : v + hl] = src[a, off : off + hl]
    dst[v + hl : v + hl + full * gso].reshape(full, gso)[:] = src[a:b, off + hl : off + hl + gso]
    dst[v + hl + full * gso : v + total] = src[b, off + hl : off + hl + last]
    mv = memoryview(dst)
    v6 = not _at(t.v4, a)
    finish_superpacket(mv, v6=v6, hl=hl, l3=l3, gso=gso, total=total, flags=int(t.flags[b]))
    return mv[: v + total]


def _at(x: np.ndarray | int, i: int) -> int:
    """Element i of a per-row array, or the value itself when every row shares it."""
    return x if isinstance(x, int) else int(x[i])
