"""A receive train of pure ACKs (one TCP flow's segments without payload, which no GRO merges) judged in
one pass, each row then written to TUN on its own, as the general path (validate_ip, coalesce) writes it.
A sending node's worker gets its peer's ACKs this way, ~20 to a train at full speed, where the general
path spent ~60 array operations on them (the whole receive of 21: ~10 us an ACK that way, ~2.7 this way).

Rules: rows 0..n-2 equally long and one flow's (row 0's prefix and IP header but IPv4's id and checksum,
its ports, data offset and flags), IPv4 without options or fragments or IPv6 with TCP next, no payload,
every checksum right. The last row, which may differ (a shorter train end, FIN), is judged alone."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import M
from udpflannel.packet.parse import validate_one
from udpflannel.packet.vnet import VNET_HDR_LEN, ZERO_VNET_HDR

Write = tuple[memoryview, ...] | tuple[bytes, memoryview]


@lru_cache(maxsize=16)
def _ack_mask(prefix: int, v6: bool, length: int) -> np.ndarray:
    """16-bit words (all or nothing) of prefix + packet that every row repeats from row 0: the prefix, the
    IP header but IPv4's id and checksum, the TCP ports and the data offset and flags word. Sequence and
    ACK numbers, window, checksum, urgent pointer and options may change from ACK to ACK."""
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    mask = np.zeros((prefix + length) // 2, np.uint16)
    mask[: (prefix + l3) // 2] = 0xFFFF
    if not v6:
        mask[[(prefix + h.IPV4_ID) // 2, (prefix + h.IPV4_CSUM) // 2]] = 0
    tcp = (prefix + l3) // 2
    mask[[tcp + h.TCP_SPORT // 2, tcp + h.TCP_DPORT // 2, tcp + h.TCP_DOFF // 2]] = 0xFFFF
    return mask


def ack_run(batch: PacketBatch, prefix: int = 0) -> list[Write] | None:
    """One write per row (a zero virtio header first) when the train is pure ACKs by the rules
    above, else None with nothing changed. Each row holds `prefix` bytes (VXLAN and inner Ethernet headers,
    judged by the caller in row 0; every row must repeat them), then its IP packet. With 10 bytes or more
    in front of each packet in its row, the virtio header is written there, in place."""
    n, off = batch.n, batch.offset
    if n < 2 or prefix & 1:
        return None
    buf, lens = batch.buf, batch.lengths
    inner = off + prefix
    first = int(lens[0]) - prefix
    if not h.IPV4_MIN_HLEN + h.TCP_MIN_HLEN <= first <= h.IPV6_HLEN + h.TCP_MAX_HLEN:
        return None
    if buf.shape[1] < inner + first:
        return None
    p0 = buf[0, inner : inner + first].tobytes()
    v6 = p0[0] >> 4 == 6
    if v6:
        l3 = h.IPV6_HLEN
        if first < l3 + h.TCP_MIN_HLEN or p0[h.IPV6_NEXT_HDR] != h.IPPROTO_TCP:
            return None
        ip_len = int.from_bytes(p0[h.IPV6_PAYLOAD_LEN : h.IPV6_PAYLOAD_LEN + 2], "big") + l3
    else:
        l3 = h.IPV4_MIN_HLEN
        frag = int.from_bytes(p0[h.IPV4_FRAG : h.IPV4_FRAG + 2], "big")
        if p0[0] != 0x45 or p0[h.IPV4_PROTO] != h.IPPROTO_TCP or frag & h.IPV4_MF_OFFSET_MASK:
            return None
        ip_len = int.from_bytes(p0[h.IPV4_TOTAL_LEN : h.IPV4_TOTAL_LEN + 2], "big")
    if ip_len != first or (p0[l3 + h.TCP_DOFF] >> 4) * 4 != first - l3:
        return None  # padded, or a payload: the general path's (it may merge segments with data)
    if n > 2 and lens[1 : n - 1].tobytes() != lens[: n - 2].tobytes():  # each the same as the one before
        return None
    # The last row, in plain Python: sound on its own, behind the same prefix.
    final = int(lens[n - 1]) - prefix
    if final <= 0 or buf.shape[1] < inner + final:
        return None
    pn = buf[n - 1].data[off : inner + final]
    code, last_len = validate_one(pn[prefix:])
    if code or last_len != final or pn[:prefix] != buf[0].data[off:inner]:
        return None
    # Rows 0..n-2: row 0's words where the mask looks (native order: the mask reads the same either way);
    # IPv4 headers sum to 0 and TCP with its pseudo-header too, as little-endian words (a byte swap is a
    # factor 256 mod 0xFFFF, which keeps 0 at 0).
    full = buf[: n - 1]
    words = full[:, off : inner + first].view(np.uint16)
    if np.count_nonzero((words ^ words[0]) & _ack_mask(prefix, v6, first)):
        return None
    if not v6 and np.count_nonzero(
        full[:, inner : inner + l3].view(np.uint16).sum(axis=1, dtype=np.uint32) % M
    ):
        return None
    sums = full[:, inner + l3 : inner + first].view(np.uint16).sum(axis=1, dtype=np.uint32)
    addrs = p0[h.IPV6_SRC : h.IPV6_DST + 16] if v6 else p0[h.IPV4_SRC : h.IPV4_DST + 4]
    sums += (int.from_bytes(addrs, "big") + h.IPPROTO_TCP + first - l3) % M * 256
    if np.count_nonzero(sums % M):
        return None
    return _writes(batch, prefix, first, final)


def _writes(batch: PacketBatch, prefix: int, first: int, final: int) -> list[Write]:
    """Each row's packet as one TUN write: gro._emit's layout for single rows, as arrays (the rows are
    equally long but the last, so no per-row Python beyond the slices; _emit's loop cost ~10 us more
    for 21 ACKs in perf/engine_micro.py)."""
    n, off, buf = batch.n, batch.offset, batch.buf
    inner = off + prefix
    in_place = inner >= VNET_HDR_LEN  # the bytes in front are the row's own (prefix, headroom)
    start = inner - VNET_HDR_LEN if in_place else inner
    if in_place:
        buf[:n, start:inner] = 0
    if buf.flags.c_contiguous:
        flat = memoryview(buf.reshape(-1))
        stride = buf.shape[1]
        views = [flat[i * stride + start : i * stride + inner + first] for i in range(n - 1)]
        last = (n - 1) * stride
        views.append(flat[last + start : last + inner + final])
    else:
        views = [buf[i].data[start : inner + first] for i in range(n - 1)]
        views.append(buf[n - 1].data[start : inner + final])
    if in_place:
        return [(v,) for v in views]
    return [(ZERO_VNET_HDR, v) for v in views]
