"""GRO over several UDP_GRO trains at once: when the receiver falls behind, one recvmmsg returns many trains
(each a sender's split superpacket), and checking them together costs the array operations of one train
instead of those of each. Trains arrive as a [m, K, s] view of the receive slots (train j's datagrams are
rows 0..counts[j]-1 of slab j; rows past that are stale bytes and are masked out). The last row of each
train is zero past its datagram's end (io.udp_recv's train sets are so), so its checksum is summed with
the others'.

A train qualifies when it is what gro_run.coalesce_run merges: every datagram but the last a full-size
copy of row 0's flow (one masked xor over all trains), the last of the same flow with ACK or ACK|PSH
(plain Python, one row a train), adjacent sequence numbers and every checksum right. Qualifying trains
become one superpacket each, built in a caller-owned output arena; the others are left to
gro.coalesce_train / the general path, which judge and count every row. The bytes written are those
gro.coalesce_train would write for the same train."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.checksum import M
from udpflannel.packet.gro_run import (
    finish_superpacket,
    ipv4_header_ok,
    last_row_flags,
    pseudo_fix,
    row_mask,
    tcp_head,
)
from udpflannel.packet.vnet import VNET_HDR_LEN

_ACK = h.TCP_ACK_FLAG
_HEAD = h.IPV6_HLEN + h.TCP_MAX_HLEN  # enough of row 0 for any IP + TCP header this path takes


@dataclass
class MergedTrains:
    """ok[j]: train j became writes[j] (virtio header + superpacket); else writes[j] is None."""

    ok: np.ndarray
    writes: list[memoryview | None]


def out_arena(slots: int, reuse: np.ndarray | None = None) -> np.ndarray:
    """An output arena for coalesce_trains: one row per train, room for a 64 KiB packet and its header.
    `reuse` (an earlier arena) is returned when it has the rows; a new one has at least 8."""
    if reuse is not None and len(reuse) >= slots:
        return reuse
    return np.empty((max(slots, 8), VNET_HDR_LEN + h.IP_MAXPACKET + 64), np.uint8)


def coalesce_trains(
    rows: np.ndarray,
    counts: np.ndarray,
    lasts: np.ndarray,
    inner: int,
    out: np.ndarray,
    full_len: int | None = None,
    *,
    same_prefix: bool = False,
) -> MergedTrains | None:
    """rows: uint8 [m, K, s], datagram i of train j at rows[j, i]; the inner IP packet of each starts at
    column `inner` and is full_len bytes long (default s - inner: datagrams end to end), but the last of
    each train, which ends at column lasts[j] and is zero from there to column inner + full_len (the
    caller's to ensure, as UdpReceiver's train sets do). out: an out_arena with >= m rows, whose rows the
    returned writes view (valid until the next call). None when the trains are not all TCP of one IP
    version and header length (the caller then takes them one by one). same_prefix: every datagram of a
    train must also repeat its row 0's `inner` bytes before the packet (a VXLAN and inner Ethernet header,
    which the caller then checks in row 0 alone); otherwise they are not looked at."""
    m, _, s = rows.shape
    full_len = s - inner if full_len is None else full_len
    width = min(s - inner, _HEAD)
    pre = inner if same_prefix else 0  # the prefix bytes held to row 0's, in front of each packet
    if width < h.IPV6_HLEN + h.TCP_MIN_HLEN or pre & 1:
        return None
    start, step = inner - pre, pre + width
    heads = rows[:, 0, start : inner + width].tobytes()
    v6 = heads[pre] >> 4 == 6
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    doff = heads[pre + l3 + h.TCP_DOFF] >> 4
    hl = l3 + doff * 4
    counts_l, lasts_l = counts.tolist(), lasts.tolist()
    if full_len <= hl or hl > width or min(lasts_l) <= inner + hl or doff < 5:
        return None
    # Per train, from its first datagram (plain Python: a few trains, a few fields): one flow of TCP, its
    # row 0 full-size with exactly ACK and a sound IPv4 header, its last datagram the same flow (and
    # prefix) with a sound IPv4 header of its own length.
    fixes, last_fixes, last_flags, ok_l = [], [], [], []
    gso = full_len - hl
    for j, (k, t) in enumerate(zip(counts_l, lasts_l, strict=True)):
        p0 = heads[j * step : (j + 1) * step]
        f = p0[pre:]
        head = tcp_head(f)
        if head is None or head[0] != v6 or f[l3 + h.TCP_DOFF] >> 4 != doff:
            return None
        ip_len = head[1]
        fix = pseudo_fix(f, v6)
        fixes.append(fix if v6 else fix + full_len)
        final = t - inner
        # The last row's checksum is summed with the others (its bytes past `final` are zero): IPv4 puts
        # its own length in its pseudo-header.
        last_fixes.append(0 if v6 else (final - full_len) % M)
        flags = None
        if k > 1:
            pn = rows[j, k - 1, start : inner + hl].tobytes()
            flags = last_row_flags(p0, pn, pre, hl, v6, final)
            if not v6 and not (ipv4_header_ok(f) and ipv4_header_ok(pn, pre)):
                flags = None
        last_flags.append(flags or 0)
        ok_l.append(
            flags is not None
            and ip_len == full_len
            and f[l3 + h.TCP_FLAGS] == _ACK
            and final <= full_len
            and (k - 1) * gso + final <= h.IP_MAXPACKET  # the merged packet's length
        )
    # Every full row: row 0's words where the mask looks (prefix, length, flags and options included).
    words = rows[:, :, start : inner + hl].view(np.uint16)
    x = (words ^ words[:, :1]) & row_mask(pre, v6, hl)
    K = words.shape[1]
    uniform = min(counts_l) == K  # every train fills the view (the usual receive): its full rows are 0..K-2
    if uniform:  # one reduction a train, not one a row
        flow_bad = np.bitwise_or.reduce(x[:, : K - 1].reshape(m, -1), axis=1) != 0
        bad = np.zeros((m, K), bool)
    else:
        bad = x.any(axis=2)
    # Adjacent sequence numbers: pair (i, i + 1) for every full row i, judged at row i (native uint32:
    # arithmetic on a big-endian view costs a byte swap per operation).
    at = inner + l3 + h.TCP_SEQ
    seq = rows[:, :, at : at + 4].view(">u4")[:, :, 0].astype(np.uint32)
    bad[:, :-1] |= (seq[:, 1:] - seq[:, :-1]) != gso
    # TCP checksums of every row, as gro_run._checksums_ok does (the last rows' too: past their end the
    # caller left zeros).
    even = full_len & ~1
    sums = rows[:, :, inner : inner + even].view("<u2").sum(axis=2, dtype=np.uint32)
    if full_len & 1:
        sums += rows[:, :, inner + even]
    sums += np.array(fixes, np.uint32)[:, None] * 256
    trains, last_rows = np.arange(m), counts - 1
    if not v6:
        sums[trains, last_rows] += np.array(last_fixes, np.uint32) * 256
    sum_bad = np.remainder(sums, M, out=sums) != 0
    bad |= sum_bad
    if not v6:
        # RFC 791 for the full rows: each repeats row 0's header but for id and checksum (the mask above),
        # so it sums to 0 mod 0xFFFF exactly when its id + checksum equals row 0's (mod 0xFFFF).
        cols = rows[:, :, inner : inner + h.IPV4_MIN_HLEN].view("<u2")
        idc = np.add(cols[:, :, h.IPV4_ID // 2], cols[:, :, h.IPV4_CSUM // 2], dtype=np.int32)
        bad |= (idc - idc[:, :1]) % M != 0
    # The last row was judged above, rows past it are stale bytes.
    if uniform:
        bad[:, K - 1] = False
    else:
        for j, k in enumerate(counts_l):
            bad[j, k - 1 :] = False
    ok = ~bad.any(axis=1) & np.array(ok_l) & ~sum_bad[trains, last_rows]
    if uniform:
        ok &= ~flow_bad
    if not ok.any():
        return MergedTrains(ok, [None] * m)
    total = [(k - 1) * gso + t - inner for k, t in zip(counts_l, lasts_l, strict=True)]
    return MergedTrains(ok, _build(rows, out, ok, inner, hl, l3, gso, total, last_flags, v6))


def _build(
    rows: np.ndarray,
    out: np.ndarray,
    ok: np.ndarray,
    inner: int,
    hl: int,
    l3: int,
    gso: int,
    total: list[int],
    last_flags: list[int],
    v6: bool,
) -> list[memoryview | None]:
    """Every train's superpacket in `out`: row 0's headers and every payload (gso bytes a row; the last
    row's tail past its end is never written out) as two copies over all trains, then each qualifying
    train's header fields patched in plain Python (a few fields per train cost less than array calls)."""
    m, K, _ = rows.shape
    v = VNET_HDR_LEN
    dst = out[:m]
    stride = out.shape[1]
    # Rows whose whole gso bytes fit an output row. A longer train (a receive that appended the next
    # message of a peer's stream) is over 64 KiB and not ok; a train that is ok may still end in a short
    # row past these, copied on its own below.
    fit = min(K, (stride - v - hl) // gso)
    dst[:, v : v + hl] = rows[:, 0, inner : inner + hl]
    dst[:, v + hl : v + hl + fit * gso].reshape(m, fit, gso)[:] = rows[:, :fit, inner + hl : inner + hl + gso]
    flat = memoryview(out.reshape(-1))
    writes: list[memoryview | None] = []
    for j, (good, t, fl) in enumerate(zip(ok.tolist(), total, last_flags, strict=True)):
        if not good:
            writes.append(None)
            continue
        final = (t - hl - 1) // gso  # the train's last row (its payload is 1..gso bytes)
        if final >= fit:
            at = hl + final * gso
            dst[j, v + at : v + t] = rows[j, final, inner + hl : inner + hl + t - at]
        mv = flat[j * stride : j * stride + v + t]
        finish_superpacket(mv, v6=v6, hl=hl, l3=l3, gso=gso, total=t, flags=fl)
        writes.append(mv)
    return writes
