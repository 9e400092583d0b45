"""GSO over several TCP superpackets at once: when the sender falls behind, one TUN batch holds several
superpackets of one flow, and splitting them together costs the ~30 array operations of one split instead
of ~30 each. The per-row arithmetic is gso._segment's, with every per-superpacket constant indexed by a
row -> superpacket map, or, for equal superpackets in consecutive rows (the common read), broadcast over
a [superpackets, segments] grid of rows. The rows come out packed (gso.split_superpacket(...,
packed=True)): superpacket g's datagrams are rows starts[g]..starts[g+1]-1 of one buffer, ready for
UDP_SEGMENT sends: one sendmmsg for them all when they are one flow's (dataplane/tx_super.py).
The bytes are gso.split_superpacket's for each superpacket alone (tests/packet/test_gso_many.py)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import M
from udpflannel.packet.gso import MAX_SEGMENTS, header_words, payload_sums
from udpflannel.packet.headers import rows_view
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6

# Superpackets from which splitting together costs less than one by one (the ~40 array operations of a
# split_many, 47-segment superpackets in a grid: 45 us a superpacket at 2, 35 at 3, 29 at 5, against 42
# one by one; /tmp timing of both, alternating).
SPLIT_MANY_MIN = 3


@dataclass
class ManySplit:
    """Superpackets split together: superpacket g's datagrams are rows starts[g] .. starts[g + 1] - 1 of
    `whole`, whose rows lie end to end (each superpacket's last row may be shorter than the stride)."""

    whole: PacketBatch
    starts: list[int]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def parts(self) -> list[PacketBatch]:
        """One packed PacketBatch per superpacket, in order: views of `whole`."""
        w = self.whole
        return [
            PacketBatch(w.buf[a:b], w.lengths[a:b], w.offset, b - a)
            for a, b in zip(self.starts[:-1], self.starts[1:], strict=True)
        ]

    def spans(self) -> list[tuple[int, int]]:
        """Each superpacket's datagrams as (byte offset, length) in the whole buffer, headroom included:
        one packed run of datagrams of `whole.stride` bytes, the last one shorter."""
        stride, head, lengths = self.whole.stride, self.whole.offset, self.whole.lengths
        return [
            (a * stride, (b - 1 - a) * stride + head + int(lengths[b - 1]))
            for a, b in zip(self.starts[:-1], self.starts[1:], strict=True)
        ]


def split_many(batch: PacketBatch, headers: np.ndarray, rows: np.ndarray, headroom: int) -> ManySplit | None:
    """Split the superpackets in `rows` of a TUN read batch (virtio headers in `headers`) together, into
    one buffer of packed rows (ManySplit). None (nothing done) unless they are all TCP of one IP version
    with one gso_size, header length and checksum layout, and sound: the caller then splits them one by
    one, which judges and counts each."""
    # A few rows: their virtio headers and first bytes judged in plain Python (cheaper than array calls).
    hd = headers[rows].tolist()  # (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) per row
    _, kind, _, mss, l3, _ = hd[0]
    if kind not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) or any(
        x[1] != kind or x[3] != mss or x[4] != l3 or x[5] != h.TCP_CSUM for x in hd
    ):
        return None
    v4 = kind == VIRTIO_NET_HDR_GSO_TCPV4
    if l3 != (h.IPV4_MIN_HLEN if v4 else h.IPV6_HLEN) or mss == 0:
        return None
    off = batch.offset
    fronts = batch.buf[rows, off : off + l3 + h.TCP_DOFF + 1].tobytes()  # IP header and TCP to its offset
    step = l3 + h.TCP_DOFF + 1
    doff = fronts[l3 + h.TCP_DOFF] >> 4
    proto_at = h.IPV4_PROTO if v4 else h.IPV6_NEXT_HDR
    for i in range(0, len(fronts), step):
        version_ok = fronts[i] == 0x45 if v4 else fronts[i] >> 4 == 6
        if (
            not version_ok
            or fronts[i + proto_at] != h.IPPROTO_TCP
            or fronts[i + l3 + h.TCP_DOFF] >> 4 != doff
        ):
            return None
    hlen = l3 + doff * 4
    lens = batch.lengths[rows].astype(np.int64)
    if doff < 5 or int(lens.min()) <= hlen:
        return None
    payload = lens - hlen
    k = -(-payload // mss)
    if int(k.max()) > MAX_SEGMENTS:
        return None
    r0 = int(rows[0])
    if int(rows[-1]) - r0 == len(rows) - 1 and not np.count_nonzero(payload - payload[0]):
        return _segment_grid(batch, r0, len(rows), headroom, l3, hlen, mss, int(payload[0]), v4=v4)
    return _segment_many(batch, rows, headroom, l3, hlen, mss, k, payload, v4=v4)


def _lay_out(
    batch: PacketBatch,
    rows: np.ndarray,
    buf: np.ndarray,
    off: int,
    hlen: int,
    mss: int,
    full: np.ndarray,
    last: np.ndarray,
    starts: np.ndarray,
) -> np.ndarray:
    """Every superpacket's header into each of its rows and its payload cut into them, each last row's tail
    zeroed (zeros do not change a sum, so every row sums the same columns); returns the template headers as
    16-bit words, int64 [G, hlen / 2]."""
    src_off = batch.offset
    words = header_words(hlen)
    consts = []
    for r, a, f, ln in zip(rows.tolist(), starts[:-1].tolist(), full.tolist(), last.tolist(), strict=True):
        pkt = batch.buf[r, src_off : src_off + hlen + f * mss + ln]
        buf[a : a + f + 1, off : off + hlen] = pkt[:hlen]
        if f:
            buf[a : a + f, off + hlen : off + hlen + mss] = pkt[hlen : hlen + f * mss].reshape(f, mss)
        tail = buf[a + f, off + hlen :]
        tail[:ln] = pkt[hlen + f * mss :]
        tail[ln:] = 0
        consts.append(words.unpack(pkt[:hlen].tobytes()))
    return np.array(consts, np.int64)


@dataclass(slots=True)
class _Template:
    """What every row of a superpacket shares, per superpacket (int64 [G]), from its header words hw: the
    constant parts of each row's IPv4 header sum (None for IPv6) and TCP checksum sum (gso._segment's
    arithmetic, mod 0xFFFF), the first id and sequence number, and the TCP flags of a middle, first and
    last segment of a superpacket of more than one."""

    ip_const: np.ndarray | None
    tcp_const: np.ndarray
    id0: np.ndarray | None
    seq0: np.ndarray
    mid: np.ndarray
    first: np.ndarray
    last: np.ndarray
    flags: np.ndarray  # the superpacket's own (a one-segment superpacket keeps them all)


def _template(hw: np.ndarray, l3: int, hlen: int, mss: int, *, v4: bool) -> _Template:
    t0 = l3 // 2
    if v4:
        shared = (
            hw[:, :t0].sum(axis=1)
            - hw[:, h.IPV4_TOTAL_LEN // 2]
            - hw[:, h.IPV4_ID // 2]
            - hw[:, h.IPV4_CSUM // 2]
        )
        ip_const, id0 = shared + hlen + mss - 1, hw[:, h.IPV4_ID // 2]
        pseudo = hw[:, h.IPV4_SRC // 2 : (h.IPV4_DST + 4) // 2].sum(axis=1) + h.IPPROTO_TCP
    else:
        ip_const = id0 = None
        pseudo = hw[:, h.IPV6_SRC // 2 : (h.IPV6_DST + 16) // 2].sum(axis=1) + h.IPPROTO_TCP
    seq_hi, seq_lo = hw[:, t0 + h.TCP_SEQ // 2], hw[:, t0 + h.TCP_SEQ // 2 + 1]
    f0 = hw[:, t0 + h.TCP_FLAGS // 2] & 0xFF
    # the TCP header but its per-row words (seq, flags, checksum); a 32-bit seq sums like its halves
    base = hw[:, t0:].sum(axis=1) - seq_hi - seq_lo - f0 - hw[:, t0 + h.TCP_CSUM // 2]
    return _Template(
        ip_const=ip_const,
        tcp_const=pseudo + base + hlen - l3 + mss - 1,
        id0=id0,
        seq0=(seq_hi << 16) | seq_lo,
        mid=f0 & ~(h.TCP_FIN | h.TCP_PSH | h.TCP_CWR) & 0xFF,
        first=f0 & ~(h.TCP_FIN | h.TCP_PSH) & 0xFF,  # CWR only on the first segment
        last=f0 & ~h.TCP_CWR & 0xFF,  # FIN and PSH only on the last
        flags=f0,
    )


def _segment_many(
    batch: PacketBatch,
    rows: np.ndarray,
    off: int,
    l3: int,
    hlen: int,
    mss: int,
    k: np.ndarray,
    payload: np.ndarray,
    *,
    v4: bool,
) -> ManySplit:
    g_count = len(rows)
    total_rows = int(k.sum())
    starts = np.zeros(g_count + 1, np.int64)
    np.cumsum(k, out=starts[1:])
    full = k - 1
    last = payload - full * mss  # 1..mss
    p0 = off + hlen
    stride = off + hlen + mss
    buf = np.empty((total_rows, stride), np.uint8)
    hw = _lay_out(batch, rows, buf, off, hlen, mss, full, last, starts)  # [G, hlen / 2] template words
    g_of = np.repeat(np.arange(g_count), k)
    i_in = np.arange(total_rows) - starts[:-1][g_of]
    last_rows = starts[1:] - 1
    lengths = np.full(total_rows, hlen + mss, np.int32)
    lengths[last_rows] = hlen + last
    short = (last - mss)[g_of]  # per row: how much shorter (only the last row of each)
    short[i_in != k[g_of] - 1] = 0
    tp = _template(hw, l3, hlen, mss, v4=v4)
    if tp.ip_const is not None and tp.id0 is not None:
        ip = rows_view(buf, off, h.IPV4_HDR)
        ids = tp.id0[g_of] + i_in
        ip["total_len"] = lengths
        ip["id"] = ids & 0xFFFF
        s = ids + tp.ip_const[g_of] + short - (ids > 0xFFFF)
        ip["csum"] = M - 1 - s % M
    else:
        rows_view(buf, off, h.IPV6_HDR)["payload_len"] = lengths - h.IPV6_HLEN
    pay = payload_sums(buf, p0, mss)
    t = rows_view(buf, off + l3, h.TCP_HDR)
    seq = (tp.seq0[g_of] + mss * i_in) & 0xFFFFFFFF
    t["seq"] = seq
    flags = tp.mid[g_of]
    flags[starts[:-1]] = tp.first
    flags[last_rows] = np.where(k == 1, tp.flags, tp.last)  # a one-row superpacket keeps all its flags
    t["flags"] = flags
    s = seq + pay + flags + short + tp.tcp_const[g_of]
    t["csum"] = M - 1 - s % M
    return ManySplit(PacketBatch(buf, lengths, off, total_rows), starts.tolist())


@lru_cache(maxsize=16)
def _grid_columns(k: int, mss: int, hlen: int, last: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per segment of a k-segment superpacket whose last payload is `last` bytes: its index, its
    datagram's length (headers included) and how much shorter than mss it is (only the last one)."""
    ar = np.arange(k, dtype=np.int64)
    lengths = np.full(k, hlen + mss, np.int32)
    lengths[-1] = hlen + last
    short = np.zeros(k, np.int64)
    short[-1] = last - mss
    for a in (ar, lengths, short):
        a.flags.writeable = False
    return ar, lengths, short


def _segment_grid(
    batch: PacketBatch, r0: int, g: int, off: int, l3: int, hlen: int, mss: int, payload: int, *, v4: bool
) -> ManySplit:
    """_segment_many for g equal superpackets in consecutive TUN rows from r0 (a sender that is behind
    mostly reads those): the rows form a [g, k] grid, so per-superpacket constants broadcast down a grid
    row and per-segment ones (cached) along a column, with no row -> superpacket index arrays."""
    k = -(-payload // mss)
    full, last = k - 1, payload - (k - 1) * mss
    p0, stride = off + hlen, off + hlen + mss
    buf = np.empty((g * k, stride), np.uint8)
    out = buf.reshape(g, k, stride)
    src = batch.buf[r0 : r0 + g, batch.offset :]
    out[:, :, off:p0] = src[:, None, :hlen]
    end = hlen + full * mss
    if full:
        out[:, :full, p0 : p0 + mss] = src[:, hlen:end].reshape(g, full, mss)
    out[:, full, p0 : p0 + last] = src[:, end : end + last]
    out[:, full, p0 + last :] = 0  # zeros do not change a sum, so every row sums the same columns
    hw = src[:, :hlen].view(">u2").astype(np.int64)  # [g, hlen / 2] template words
    ar, lengths_k, short = _grid_columns(k, mss, hlen, last)
    tp = _template(hw, l3, hlen, mss, v4=v4)
    if tp.ip_const is not None and tp.id0 is not None:
        ip = rows_view(buf, off, h.IPV4_HDR).reshape(g, k)
        ip["total_len"] = lengths_k
        ids = tp.id0[:, None] + ar
        ip["id"] = ids & 0xFFFF
        # a wrapped id sums like the unwrapped one minus 1 (0x10000 is 1 mod 0xFFFF)
        s = ids + short + tp.ip_const[:, None] - (ids > 0xFFFF)
        ip["csum"] = M - 1 - s % M
    else:
        rows_view(buf, off, h.IPV6_HDR).reshape(g, k)["payload_len"] = lengths_k - h.IPV6_HLEN
    pay = payload_sums(buf, p0, mss).reshape(g, k)
    t = rows_view(buf, off + l3, h.TCP_HDR).reshape(g, k)
    seq = (tp.seq0[:, None] + mss * ar) & 0xFFFFFFFF
    t["seq"] = seq
    flags = np.empty((g, k), np.int64)
    flags[:] = tp.mid[:, None]
    flags[:, 0] = tp.first
    flags[:, -1] = tp.flags if k == 1 else tp.last
    t["flags"] = flags
    s = seq + pay + flags + short + tp.tcp_const[:, None]
    t["csum"] = M - 1 - s % M
    lengths = np.empty((g, k), np.int32)
    lengths[:] = lengths_k
    return ManySplit(PacketBatch(buf, lengths.reshape(-1), off, g * k), list(range(0, g * k + 1, k)))
