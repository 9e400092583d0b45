"""Transport data as numpy rows, for the hot path: seal one peer's segments into one GSO-ready buffer, and
open a UDP_GRO train in place on its strided view.

Headers, nonces, padding, the replay window, inner lengths and allowed IPs are handled once per batch with
array operations; the only per-row Python work left is the AEAD call (DESIGN.md, data path 6). The bytes
on the wire and the drops counted are those of batch.py's seal_batch/open_batch (tests compare them).
No sockets, no clock: `now` is one value for the whole batch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag

from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.events import Drop, DropReason, Endpoint, Event, Queued
from udpflannel.codec.wireguard.session import Device, Peer
from udpflannel.codec.wireguard.timers import TimerKind

_HDR = m.MESSAGE_TRANSPORT_HEADER_SIZE
_TAG = m.MESSAGE_TRANSPORT_SIZE - m.MESSAGE_TRANSPORT_HEADER_SIZE
_CTR = m.MESSAGE_TRANSPORT_OFFSET_COUNTER
_NONCE = 12  # 4 zero bytes, then the counter as u64 LE (spec/wireguard.md "Messages")
_PAD = m.PADDING_MULTIPLE
# Inner IP header fields, as offsets into the decrypted row (the plaintext starts at _HDR).
_V4_TOTAL_LEN = _HDR + 2
_V4_SRC = _HDR + 12
_V6_PAYLOAD_LEN = _HDR + 4
_V6_SRC = _HDR + 8
_IPV4_MIN = 20
_IPV6_HLEN = 40
_PLAIN_V4 = 0x45  # version 4, 20-byte header: the first byte of nearly every inner IPv4 packet
_TYPE_RECEIVER = struct.Struct("<II")  # the first 8 header bytes: type (u8 + 3 zero bytes), receiver index


@dataclass(slots=True)
class SealedRows:
    """n messages in `rows` (a view of the caller's buffer, one message per row from its start); message i
    is rows[i, :sizes[i]]. When `contiguous`, every message but the last fills its row exactly and the
    last is no longer: `flat` holds them back to back, for one UDP_SEGMENT send of segment size `stride`."""

    endpoint: Endpoint | None
    rows: np.ndarray
    sizes: list[int]
    contiguous: bool

    @property
    def stride(self) -> int:
        return int(self.rows.shape[1])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def flat(self) -> np.ndarray:
        """The messages back to back (contiguous batches only)."""
        return self.rows.reshape(-1)[: (len(self.sizes) - 1) * self.stride + self.sizes[-1]]


def seal_rows(
    device: Device,
    public_key: bytes,
    buf: np.ndarray,
    offset: int,
    lengths: np.ndarray,
    out: np.ndarray,
    now: float,
    index: np.ndarray | None = None,
    views: ViewCache | None = None,
) -> SealedRows | Queued | Drop:
    """Encrypt packets for one peer, with consecutive counters, into `out` (flat uint8), encrypting in
    place there. Packet i is buf[r, offset : offset + lengths[i]] with r = index[i] (or i without an
    index). Packets of equal length (a split superpacket) give equal-size messages laid out back to back,
    ready for UDP GSO. `views`, a ViewCache over `out`, saves re-slicing rows that had the same layout
    in an earlier batch."""
    peer = device.peers[public_key]
    n = len(lengths)
    picked = range(n) if index is None else index.tolist()
    kp = device._sendable_keypair(peer, now)
    if kp is not None and kp.send_nonce + n > device.timing.reject_after_messages:
        kp = None  # the batch would run past REJECT_AFTER_MESSAGES: wait for a fresh keypair instead
    if kp is None:
        for r, ln in zip(picked, lengths.tolist(), strict=True):
            device._stage(peer, buf[r, offset : offset + ln].tobytes())
        peer.timers.arm(TimerKind.SEND_INITIATION, now)
        return Queued(public_key)
    first, last = int(lengths[0]), int(lengths[-1])
    if last <= first and (n < 3 or bool((lengths[1:-1] == first).all())):
        # A split superpacket: every packet but a shorter last one has the same length, so every
        # per-row quantity is one of two Python ints and the messages lie back to back.
        p_first, p_last = device.padded_length(first), device.padded_length(last)
        padded = [p_first] * (n - 1) + [p_last]
        contiguous = True
        stride = p_first + m.MESSAGE_TRANSPORT_SIZE
        longest, any_data = first, first > 0
    else:
        plain = lengths.astype(np.int64)
        pad_np = (plain + (_PAD - 1)) & -_PAD
        if device.mtu:
            # wireguard-go calculatePaddingSize: never pad past the MTU.
            pad_np = np.minimum(pad_np, device.mtu)
            over = plain > device.mtu
            if over.any():
                pad_np[over] = [device.padded_length(x) for x in plain[over].tolist()]
        padded = pad_np.tolist()
        contiguous = False
        stride = max(padded) + m.MESSAGE_TRANSPORT_SIZE
        longest, any_data = int(plain.max()), bool(plain.any())
    if n * stride > out.size:
        return device._drop(DropReason.TOO_BIG, n)
    rows = out[: n * stride].reshape(n, stride)
    counter = kp.send_nonce
    kp.send_nonce += n
    rows[:, :_CTR] = np.frombuffer(_TYPE_RECEIVER.pack(m.MESSAGE_TRANSPORT_TYPE, kp.remote_index), np.uint8)
    rows[:, _CTR:_HDR].view("<u8")[:, 0] = np.arange(n, dtype=np.uint64) + np.uint64(counter)
    cols = slice(offset, offset + longest)
    # With an index, only the packet columns of the picked rows are gathered (TUN rows are 64 KiB wide).
    rows[:, _HDR : _HDR + longest] = buf[:n, cols] if index is None else buf[index, cols]
    if contiguous:
        if p_first > first:
            rows[:, _HDR + first : _HDR + p_first] = 0  # the last row's tail is zeroed below
        if p_last > last:
            rows[-1, _HDR + last : _HDR + p_last] = 0
    else:
        _zero_padding(rows, lengths, padded)
    encrypt_into = getattr(kp.send, "encrypt_into", None)
    cached = views is not None and views.buf is out and views.fits(0, stride, n)
    if cached and contiguous and encrypt_into is not None:
        views.nonces[:n, _NONCE - 8 :] = rows[:, _CTR:_HDR]
        pairs = views.pairs(0, stride, p_first, n)
        for nonce, (plain_view, sealed_view) in zip(views.nonce_views, pairs[: n - 1], strict=False):
            encrypt_into(nonce, plain_view, None, sealed_view)
        b = (n - 1) * stride + _HDR
        encrypt_into(
            views.nonce_views[n - 1], views.mv[b : b + p_last], None, views.mv[b : b + p_last + _TAG]
        )
    else:
        _encrypt_rows(kp.send, rows, out, stride, padded)
    if contiguous:
        sizes = [stride] * (n - 1) + [p_last + m.MESSAGE_TRANSPORT_SIZE]
    else:
        sizes = [p + m.MESSAGE_TRANSPORT_SIZE for p in padded]
    device._after_send(peer, kp, any_data, sum(sizes), now)
    return SealedRows(peer.endpoint, rows, sizes, contiguous)


def _encrypt_rows(aead: object, rows: np.ndarray, out: np.ndarray, stride: int, padded: list[int]) -> None:
    """encrypt_into every row in place: row i's padded plaintext becomes its ciphertext and tag."""
    n = len(padded)
    nonces = np.zeros((n, _NONCE), np.uint8)
    nonces[:, _NONCE - 8 :] = rows[:, _CTR:_HDR]
    nb = nonces.tobytes()
    mv = memoryview(out)
    encrypt_into = getattr(aead, "encrypt_into", None)
    starts = range(_HDR, n * stride, stride)
    for j, b, p in zip(range(0, n * _NONCE, _NONCE), starts, padded, strict=True):
        if encrypt_into is not None:
            encrypt_into(nb[j : j + _NONCE], mv[b : b + p], None, mv[b : b + p + _TAG])
        else:  # cryptography < 44: no _into methods
            mv[b : b + p + _TAG] = aead.encrypt(nb[j : j + _NONCE], bytes(mv[b : b + p]), None)  # type: ignore[attr-defined]


def _zero_padding(rows: np.ndarray, lengths: np.ndarray, padded: list[int]) -> None:
    """WireGuard's zero padding after each plaintext (at most 15 bytes a row), for rows of mixed lengths."""
    plain = lengths.astype(np.int64)
    pad = np.asarray(padded, np.int64) - plain
    r, c = np.nonzero(np.arange(_PAD) < pad[:, None])
    if len(r):
        rows[r, _HDR + plain[r] + c] = 0


@dataclass(slots=True)
class OpenedRows:
    """A train opened in place: where keep[i] (every row if keep is None), rows[i, 16 : 16 + lengths[i]]
    is an inner packet from peer `peer`. Drops are counted in the device; `events` are the handshake
    follow-ups to send."""

    peer: bytes | None
    keep: np.ndarray | None  # bool [k]; None: every row
    lengths: np.ndarray  # int32 [k]
    events: list[Event]

    @property
    def delivered(self) -> int:
        return len(self.lengths) if self.keep is None else int(np.count_nonzero(self.keep))


def open_rows(
    device: Device,
    rows: np.ndarray,
    last_size: int,
    src: Endpoint,
    now: float,
    views: ViewCache | None = None,
    base: int = 0,
) -> OpenedRows | None:
    """Decrypt a train of transport messages in place. `rows` is a C-contiguous (k, s) uint8 view: message
    i is rows[i] (s bytes), the last one only `last_size` bytes (UDP_GRO's shorter tail). Returns None when
    the train is not k transport messages under one receiver index: open it with batch.open_batch then.
    With `views` (a ViewCache over the buffer `rows` lies in, from flat offset `base`), row slices are
    reused from earlier trains of the same layout."""
    k, s = rows.shape
    if s < m.MESSAGE_TRANSPORT_SIZE or not m.MESSAGE_TRANSPORT_SIZE <= last_size <= s:
        return None
    # Type word and receiver index as one u64 per row: every row must carry row 0's, of type 4.
    heads = rows[:, :_CTR].view("<u8")[:, 0]
    head = int(heads[0])
    if head & 0xFFFFFFFF != m.MESSAGE_TRANSPORT_TYPE or not bool((heads == head).all()):
        return None
    receiver = head >> 32
    drops = device.drops
    nothing = np.zeros(k, bool)
    entry = device.index_table.get(receiver)
    if entry is None or entry.keypair is None:
        drops[DropReason.UNKNOWN_INDEX] += k
        return OpenedRows(None, nothing, np.zeros(k, np.int32), [])
    kp, peer = entry.keypair, entry.peer
    if now - kp.created >= device.timing.reject_after_time:
        drops[DropReason.KEY_EXPIRED] += k
        return OpenedRows(None, nothing, np.zeros(k, np.int32), [])
    if views is not None and hasattr(kp.recv, "decrypt_into") and views.fits(base, s, k):
        views.nonces[:k, _NONCE - 8 :] = rows[:, _CTR:_HDR]
        bad = _decrypt_cached(kp.recv, views, base, k, s, last_size)
    else:
        nonces = np.zeros((k, _NONCE), np.uint8)
        nonces[:, _NONCE - 8 :] = rows[:, _CTR:_HDR]
        bad = _decrypt(kp.recv, nonces.tobytes(), memoryview(rows.reshape(-1)), k, s, last_size)
    # Replay check only after authentication (whitepaper 5.4.6); a consecutive run is one window update.
    counters = rows[:, _CTR:_HDR].view("<u8")[:, 0]
    limit = device.timing.reject_after_messages
    first = int(counters[0])
    # (np.diff costs twice the slices: its Python wrapper)
    run = (
        not bad
        and int(counters[-1]) - first == k - 1
        and (k < 3 or not np.count_nonzero(counters[1:] - counters[:-1] - np.uint64(1)))
    )
    ok: np.ndarray | None = None  # None: every row authenticated and fresh (the common case)
    if run and kp.replay.accept_run(first, k, limit):
        size = (k - 1) * s + last_size
    else:
        ok = np.ones(k, bool)
        if bad:
            ok[bad] = False
            drops[DropReason.DECRYPT_FAILED] += len(bad)
        validate = kp.replay.validate_counter
        replayed = [i for i, c in enumerate(counters.tolist()) if ok[i] and not validate(c, limit)]
        if replayed:
            ok[replayed] = False
            drops[DropReason.REPLAY] += len(replayed)
        if not ok.any():
            return OpenedRows(None, nothing, np.zeros(k, np.int32), [])
        size = int(ok.sum()) * s + (last_size - s if ok[-1] else 0)
    events = device._after_authenticated_receive(peer, kp, src, size, now)
    if ok is None and last_size > m.MESSAGE_TRANSPORT_SIZE and bool((rows[:, _HDR] == _PLAIN_V4).all()):
        lengths = _plain_v4_lengths(peer, rows, s, last_size)
        if lengths is not None:
            peer.timers.on_data_received(now)
            return OpenedRows(peer.public_key, None, lengths, events)
    return _open_inner(device, peer, rows, np.ones(k, bool) if ok is None else ok, last_size, events, now)


def _plain_v4_lengths(peer: Peer, rows: np.ndarray, s: int, last_size: int) -> np.ndarray | None:
    """Inner lengths of a train of option-less IPv4 packets that all fit and are all allowed; None if any
    row is not so (then _open_inner judges, and counts, row by row)."""
    length = rows[:, _V4_TOTAL_LEN : _V4_TOTAL_LEN + 2].view(">u2")[:, 0].astype(np.int32)
    body = s - m.MESSAGE_TRANSPORT_SIZE
    if int(length.min()) < _IPV4_MIN or int(length[-1]) > last_size - m.MESSAGE_TRANSPORT_SIZE:
        return None
    if len(length) > 1 and int(length[:-1].max()) > body:
        return None
    if peer.allowed_ranges:
        n4, m4, _, _ = _allowed_arrays(peer)
        src = rows[:, _V4_SRC : _V4_SRC + 4].view(">u4")[:, 0]
        if len(n4) == 1:
            hit = bool(((src & m4[0]) == n4[0]).all())
        else:
            hit = bool(((src[:, None] & m4) == n4).any(axis=1).all())
        if not hit:
            return None
    return length


def _open_inner(
    device: Device,
    peer: Peer,
    rows: np.ndarray,
    ok: np.ndarray,
    last_size: int,
    events: list[Event],
    now: float,
) -> OpenedRows:
    """Per-row inner checks of authenticated rows `ok`: keepalives, IP version and length, allowed IPs."""
    k, s = rows.shape
    drops = device.drops
    plen = np.full(k, s - m.MESSAGE_TRANSPORT_SIZE, np.int64)
    plen[-1] = last_size - m.MESSAGE_TRANSPORT_SIZE
    data = ok & (plen > 0)  # the others are keepalives
    if not data.any():
        return OpenedRows(peer.public_key, np.zeros(k, bool), np.zeros(k, np.int32), events)
    peer.timers.on_data_received(now)
    version = rows[:, _HDR] >> 4
    v4, v6 = version == 4, version == 6
    v4_len = rows[:, _V4_TOTAL_LEN : _V4_TOTAL_LEN + 2].view(">u2")[:, 0].astype(np.int64)
    v6_len = rows[:, _V6_PAYLOAD_LEN : _V6_PAYLOAD_LEN + 2].view(">u2")[:, 0].astype(np.int64) + _IPV6_HLEN
    length = np.where(v4, v4_len, np.where(v6, v6_len, 0))
    sound = (
        (length <= plen) & (plen >= _IPV4_MIN) & ((v4 & (length >= _IPV4_MIN)) | (v6 & (plen >= _IPV6_HLEN)))
    )
    keep = data & sound
    if (data & ~sound).any():
        drops[DropReason.BAD_INNER_PACKET] += int(np.count_nonzero(data & ~sound))
    if peer.allowed_ranges:
        allowed = _allowed(peer, rows, keep & v4, keep & v6)
        refused = int(np.count_nonzero(keep & ~allowed))
        if refused:
            drops[DropReason.NOT_ALLOWED_IP] += refused
            keep &= allowed
    return OpenedRows(peer.public_key, keep, length.astype(np.int32), events)


def _decrypt_cached(aead: object, views: ViewCache, base: int, k: int, s: int, last_size: int) -> list[int]:
    """_decrypt with the nonces already in views.nonces and row slices from the cache."""
    decrypt_into = aead.decrypt_into  # type: ignore[attr-defined]
    body = s - m.MESSAGE_TRANSPORT_SIZE
    pairs = views.pairs(base, s, body, k)
    bad: list[int] = []
    for i, nonce, (plain_view, sealed_view) in zip(range(k - 1), views.nonce_views, pairs, strict=False):
        try:
            decrypt_into(nonce, sealed_view, None, plain_view)
        except InvalidTag:
            bad.append(i)
    b = base + (k - 1) * s + _HDR
    end = base + (k - 1) * s + last_size
    try:
        decrypt_into(views.nonce_views[k - 1], views.mv[b:end], None, views.mv[b : end - _TAG])
    except InvalidTag:
        bad.append(k - 1)
    return bad


def _decrypt(aead: object, nb: bytes, mv: memoryview, k: int, s: int, last_size: int) -> list[int]:
    """decrypt_into every row in place (plaintext over the ciphertext); the rows whose tag failed."""
    decrypt_into = getattr(aead, "decrypt_into", None)
    bad: list[int] = []
    for i, j, b in zip(range(k), range(0, k * _NONCE, _NONCE), range(0, k * s, s), strict=True):
        end = b + (s if i < k - 1 else last_size)
        try:
            if decrypt_into is not None:
                decrypt_into(nb[j : j + _NONCE], mv[b + _HDR : end], None, mv[b + _HDR : end - _TAG])
            else:  # cryptography < 44: no _into methods
                mv[b + _HDR : end - _TAG] = aead.decrypt(nb[j : j + _NONCE], bytes(mv[b + _HDR : end]), None)  # type: ignore[attr-defined]
        except InvalidTag:
            bad.append(i)
    return bad


def _allowed(peer: Peer, rows: np.ndarray, v4: np.ndarray, v6: np.ndarray) -> np.ndarray:
    """Per row: the inner source address lies in the peer's allowed IPs (rows of other versions: True)."""
    n4, m4, n6, m6 = _allowed_arrays(peer)
    allowed = np.ones(len(rows), bool)
    if v4.any():
        src = rows[:, _V4_SRC : _V4_SRC + 4].view(">u4")[:, 0]
        allowed &= ~v4 | ((src[:, None] & m4) == n4).any(axis=1)
    if v6.any() and rows.shape[1] >= _V6_SRC + 16:
        src6 = rows[:, _V6_SRC : _V6_SRC + 16].view(">u8")  # (k, 2): high and low 64 bits
        hit = ((src6[:, None, :] & m6) == n6).all(axis=2).any(axis=1)
        allowed &= ~v6 | hit
    return allowed


def _allowed_arrays(peer: Peer) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """peer.allowed_ranges as arrays (IPv6 as two u64 halves), cached on the peer until its IPs change."""
    cached = peer.allowed_arrays
    if cached is None:
        r4, r6 = peer.allowed_ranges.get(4, []), peer.allowed_ranges.get(6, [])
        n4 = np.array([net for net, _ in r4], np.uint32)
        m4 = np.array([mask for _, mask in r4], np.uint32)
        half = (1 << 64) - 1
        n6 = np.array([[net >> 64, net & half] for net, _ in r6], np.uint64).reshape(-1, 2)
        m6 = np.array([[mask >> 64, mask & half] for _, mask in r6], np.uint64).reshape(-1, 2)
        cached = peer.allowed_arrays = (n4, m4, n6, m6)
    return cached


class ViewCache:
    """Memoryview slices of one long-lived buffer (the engine's send buffer or receive arena), kept for
    the next batch of the same layout: two fresh slices per row cost about a quarter of an AEAD call.
    Nonces go to a preallocated array whose row views are kept the same way. Not thread-safe."""

    def __init__(self, buf: np.ndarray, max_rows: int, max_layouts: int = 16) -> None:
        self.buf = buf
        self.size = buf.size
        self.mv = memoryview(buf.reshape(-1))
        self.nonces = np.zeros((max_rows, _NONCE), np.uint8)
        flat = memoryview(self.nonces.reshape(-1))
        self.nonce_views = [flat[i * _NONCE : (i + 1) * _NONCE] for i in range(max_rows)]
        self.max_layouts = max_layouts
        self._pairs: dict[tuple[int, int, int], list[tuple[memoryview, memoryview]]] = {}

    def fits(self, base: int, stride: int, count: int) -> bool:
        return count <= len(self.nonce_views) and base + count * stride <= self.size

    def pairs(self, base: int, stride: int, body: int, count: int) -> list[tuple[memoryview, memoryview]]:
        """For rows of `stride` bytes from flat offset `base`: (body, body + tag) views after each row's
        16-byte header, for at least `count` rows (callers check fits() first)."""
        key = (base, stride, body)
        got = self._pairs.get(key)
        if got is None or len(got) < count:
            if got is None and len(self._pairs) >= self.max_layouts:
                self._pairs.clear()
            rows = min(len(self.nonce_views), (self.size - base) // stride)
            mv = self.mv
            starts = range(base + _HDR, base + rows * stride, stride)
            got = self._pairs[key] = [(mv[b : b + body], mv[b : b + body + _TAG]) for b in starts]
        return got
