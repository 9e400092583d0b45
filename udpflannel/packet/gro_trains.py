"""GRO over several UDP_GRO trains at once: when the receiver falls behind, one recvmmsg returns many trains
(each a sender's split superpacket), and checking them together costs the ~40 array operations of one
train instead of ~40 per train. Trains arrive as a [m, K, s] view of the receive slots (train j's datagrams
are rows 0..counts[j]-1 of slab j; rows past that are stale bytes and are masked out).

A train qualifies when every datagram carries a sound, checksummed TCP segment of one flow that joins the
previous one by the rules of gro.py (ACK only, the last may add PSH; adjacent sequence numbers; equal
sizes but the last). Qualifying trains become one superpacket each, built in a caller-owned output arena;
the others are left to gro.coalesce_train / the general path, which judge and count every row. The bytes
written are those gro.coalesce_train would write for the same train."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.checksum import M
from udpflannel.packet.gro import _V4_TRAIN_MASK, _V6_TRAIN_MASK
from udpflannel.packet.gro_run import finish_superpacket
from udpflannel.packet.vnet import VNET_HDR_LEN

# gro's flow-key masks, plus the words coalesce_trains predicts: IP length, TCP sequence number, flags.
_V4_MASK = _V4_TRAIN_MASK.copy()
_V4_MASK[[h.IPV4_TOTAL_LEN // 2, 10 + 2, 10 + 3]] = 0xFFFF
_V4_MASK[10 + 6] = 0xF0FF
_V6_MASK = _V6_TRAIN_MASK.copy()
_V6_MASK[[h.IPV6_PAYLOAD_LEN // 2, 20 + 2, 20 + 3]] = 0xFFFF
_V6_MASK[20 + 6] = 0xF0FF


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
) -> MergedTrains | None:
    """rows: uint8 [m, K, s], datagram i of train j at rows[j, i]; the inner IP packet of each starts at
    column `inner` and is full_len bytes long (default s - inner: datagrams end to end), but the last of
    each train, which ends at column lasts[j]. out: an out_arena with >= m rows, whose rows the returned
    writes view (valid until the next call). None when the trains are not all TCP of one IP version and
    header length (the caller then takes them one by one)."""
    m, K, s = rows.shape
    full_len = s - inner if full_len is None else full_len
    if s < inner + h.IPV6_HLEN + h.TCP_MIN_HLEN:
        return None
    heads = rows[:, 0, inner : inner + h.IPV6_HLEN + h.TCP_MIN_HLEN].tobytes()
    v6 = heads[0] >> 4 == 6
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    tw = l3 // 2
    wide = h.IPV6_HLEN + h.TCP_MIN_HLEN
    # Per train, from its first datagram (plain Python: a few trains, a few fields): one flow of TCP.
    doff = heads[l3 + h.TCP_DOFF] >> 4
    hl = l3 + doff * 4
    if full_len <= hl or int(lasts.min()) <= inner + hl or doff < 5:
        return None
    for j in range(m):
        f = heads[j * wide : (j + 1) * wide]
        if v6:
            good = f[0] >> 4 == 6 and f[h.IPV6_NEXT_HDR] == h.IPPROTO_TCP
        else:
            good = f[0] == 0x45 and f[h.IPV4_PROTO] == h.IPPROTO_TCP and not (f[6] & 0x3F or f[7])
        if not good or f[l3 + h.TCP_DOFF] >> 4 != doff:
            return None
    a = rows[:, :, inner : inner + l3 + h.TCP_MIN_HLEN].view(">u2").astype(np.int64)  # [m, K, words]
    a0 = a[:, 0]
    gso = full_len - hl
    ar = np.arange(K)
    last_row = counts - 1
    at_last = (np.arange(m), last_row)
    # What every datagram must hold where the mask looks: row 0's words, with its own length, its
    # sequence number and exactly ACK (PSH, allowed on the last datagram, is cleared there first).
    want = np.repeat(a0[:, None, :], K, axis=1)
    lengths = np.full((m, K), full_len, np.int64)
    lengths[at_last] = lasts - inner
    want[:, :, h.IPV6_PAYLOAD_LEN // 2 if v6 else h.IPV4_TOTAL_LEN // 2] = lengths - (l3 if v6 else 0)
    seq = ((a0[:, tw + 2] << 16) | a0[:, tw + 3])[:, None] + ar * gso
    want[:, :, tw + 2] = (seq >> 16) & 0xFFFF
    want[:, :, tw + 3] = seq & 0xFFFF
    want[:, :, tw + 6] = (a0[:, tw + 6, None] & 0xF000) | h.TCP_ACK_FLAG
    last_flags = a[:, :, tw + 6][at_last] & 0xFF
    a[:, :, tw + 6][at_last] &= ~h.TCP_PSH
    diff = (a ^ want) & (_V6_MASK if v6 else _V4_MASK)
    bad = diff.any(axis=2)
    if hl > l3 + h.TCP_MIN_HLEN:
        opts = rows[:, :, inner + l3 + h.TCP_MIN_HLEN : inner + hl]
        bad |= (opts != opts[:, :1]).any(axis=2)
    # TCP checksums as in gro._train: the packet's sum, plus the pseudo-header the IP header lacks.
    net = _sums(rows, inner, full_len, counts, lasts)
    if v6:
        net += (4 * M - a0[:, 0] - a0[:, 1] - a0[:, h.IPV6_NEXT_HDR // 2] + h.IPPROTO_TCP)[:, None]
    else:
        bad |= a[:, :, :10].sum(axis=2) % M != 0  # RFC 791: a sound header sums to 0 mod 0xFFFF
        addr = a0[:, h.IPV4_SRC // 2 : (h.IPV4_DST + 4) // 2].sum(axis=1)
        net += lengths + (addr + h.IPPROTO_TCP - h.IPV4_MIN_HLEN)[:, None]
    bad |= net % M != 0
    bad[ar >= counts[:, None]] = False  # stale rows past each train's end
    total = hl + (counts - 1) * gso + (lasts - inner - hl)
    ok = ~bad.any(axis=1) & (total <= h.IP_MAXPACKET) & (lasts - inner <= full_len)
    if not ok.any():
        return MergedTrains(ok, [None] * m)
    return MergedTrains(ok, _build(rows, out, ok, inner, hl, l3, gso, total, last_flags, v6))


def _sums(rows: np.ndarray, inner: int, full_len: int, counts: np.ndarray, lasts: np.ndarray) -> np.ndarray:
    """Per datagram, the sum of its inner packet's bytes (network order, mod 0xFFFF, unfolded). Full-length
    datagrams in one pass over [m, K] rows; each train's last datagram, shorter, on its own."""
    q, r = full_len >> 2, full_len & 3
    s = rows[:, :, inner : inner + q * 4].view("<u4").sum(axis=2, dtype=np.int64)
    c = inner + q * 4
    for k in range(r):  # the 1-3 bytes after the last whole word, as a little-endian word
        s += rows[:, :, c + k].astype(np.int64) << (8 * k)
    s *= 256  # little-endian words to network order (mod 0xFFFF)
    for j, (k, t) in enumerate(zip(counts.tolist(), lasts.tolist(), strict=True)):
        ln = t - inner
        x = int.from_bytes(rows[j, k - 1, inner:t].tobytes(), "big")  # 2**16 is 1 mod 0xFFFF
        s[j, k - 1] = ((x << 8) if ln & 1 else x) % M
    return s


def _build(
    rows: np.ndarray,
    out: np.ndarray,
    ok: np.ndarray,
    inner: int,
    hl: int,
    l3: int,
    gso: int,
    total: np.ndarray,
    last_flags: np.ndarray,
    v6: bool,
) -> list[memoryview | None]:
    """Every train's superpacket in `out`: row 0's headers and every payload (gso bytes a row; the last
    row's tail past its end is never written out) as two copies over all trains, then each qualifying
    train's header fields patched in plain Python (a few fields per train cost less than array calls)."""
    m, K, _ = rows.shape
    v = VNET_HDR_LEN
    dst = out[:m]
    dst[:, v : v + hl] = rows[:, 0, inner : inner + hl]
    dst[:, v + hl : v + hl + K * gso].reshape(m, K, gso)[:] = rows[:, :, inner + hl : inner + hl + gso]
    flat = memoryview(out.reshape(-1))
    stride = out.shape[1]
    writes: list[memoryview | None] = []
    for j, (good, t, fl) in enumerate(zip(ok.tolist(), total.tolist(), last_flags.tolist(), strict=True)):
        if not good:
            writes.append(None)
            continue
        mv = flat[j * stride : j * stride + v + t]
        finish_superpacket(mv, v6=v6, hl=hl, l3=l3, gso=gso, total=t, flags=fl)
        writes.append(mv)
    return writes
