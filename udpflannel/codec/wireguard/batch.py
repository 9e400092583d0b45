"""Batch transport path: seal many payloads for one peer into one preallocated buffer, open many datagrams
in place. Python work per batch is O(1) apart from the AEAD call per segment (DESIGN.md, data path 6).

Counters are assigned per batch; timers and stats are updated once per batch and keypair. No sockets,
no clock: `now` is one value for the whole batch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.events import Drop, DropReason, Endpoint, Event, Queued
from udpflannel.codec.wireguard.keypairs import Keypair
from udpflannel.codec.wireguard.session import Device, inner_packet_length
from udpflannel.codec.wireguard.timers import TimerKind

_NONCE_PREFIX = b"\x00\x00\x00\x00"
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<IIQ")
_TAG = 16
_MAX_OVERHEAD = m.MESSAGE_TRANSPORT_HEADER_SIZE + _TAG + m.PADDING_MULTIPLE - 1
_NO_MTU = 1 << 30
_ZEROS = bytes(m.PADDING_MULTIPLE)
# encrypt_into/decrypt_into arrived in cryptography 44 (fastpath.md measures 48); older ones copy instead.
_HAVE_INTO = hasattr(ChaCha20Poly1305, "encrypt_into") and hasattr(ChaCha20Poly1305, "decrypt_into")

Buffer = bytes | bytearray | memoryview


@dataclass(slots=True)
class SealedBatch:
    """Messages written back to back into the caller's buffer from `offset`; sizes[i] is message i's size."""

    endpoint: Endpoint | None
    offset: int
    sizes: list[int]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def sealed_size(device: Device, lengths: Sequence[int]) -> int:
    return sum(m.MESSAGE_TRANSPORT_HEADER_SIZE + device.padded_length(n) + _TAG for n in lengths)


def seal_batch(
    device: Device,
    public_key: bytes,
    segments: Sequence[Buffer],
    out: bytearray | memoryview,
    now: float,
    offset: int = 0,
) -> SealedBatch | Queued | Drop:
    """Encrypt `segments` (plaintext IP packets) for one peer with consecutive counters, in place in `out`
    (ChaCha20Poly1305.encrypt_into). Equal-length segments give equal-size messages, ready for UDP GSO."""
    peer = device.peers[public_key]
    kp = device._sendable_keypair(peer, now)
    if kp is not None and kp.send_nonce + len(segments) > device.timing.reject_after_messages:
        kp = None  # the batch would run past REJECT_AFTER_MESSAGES: wait for a fresh keypair instead
    if kp is None:
        for seg in segments:
            device._stage(peer, bytes(seg))
        peer.timers.arm(TimerKind.SEND_INITIATION, now)
        return Queued(public_key)
    count = len(segments)
    # Cheap bound first (header + tag + at most 15 bytes of padding each); the exact sum only near the limit.
    if offset + sum(map(len, segments)) + count * _MAX_OVERHEAD > len(out) and offset + sealed_size(
        device, [len(s) for s in segments]
    ) > len(out):
        return device._drop(DropReason.TOO_BIG, count)
    mv = memoryview(out)
    send = kp.send
    counter = kp.send_nonce
    kp.send_nonce += count
    receiver = kp.remote_index
    mtu = device.mtu or _NO_MTU
    pos = offset
    sizes: list[int] = []
    any_data = False
    for seg in segments:
        n = len(seg)
        # wireguard-go calculatePaddingSize with the common case (n <= MTU) inlined.
        padded = min((n + 15) & -16, mtu) if n <= mtu else device.padded_length(n)
        _HEADER.pack_into(mv, pos, m.MESSAGE_TRANSPORT_TYPE, receiver, counter)
        body = pos + m.MESSAGE_TRANSPORT_HEADER_SIZE
        end = body + padded
        mv[body : body + n] = seg
        if padded > n:
            mv[body + n : end] = _ZEROS[: padded - n]
        nonce = _NONCE_PREFIX + _U64.pack(counter)
        if _HAVE_INTO:
            send.encrypt_into(nonce, mv[body:end], None, mv[body : end + _TAG])
        else:
            mv[body : end + _TAG] = send.encrypt(nonce, bytes(mv[body:end]), None)
        size = end + _TAG - pos
        sizes.append(size)
        pos += size
        counter += 1
        any_data = any_data or n > 0
    device._after_send(peer, kp, any_data, pos - offset, now)
    return SealedBatch(endpoint=peer.endpoint, offset=offset, sizes=sizes)


@dataclass(slots=True)
class OpenedBatch:
    """delivered: (peer public key, inner packet view into the caller's datagram buffer) in arrival order;
    indices: the input position of each delivered packet; events: everything else (handshake replies,
    HandshakeCompleted, staged packets, drops)."""

    delivered: list[tuple[bytes, memoryview]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def open_batch(device: Device, datagrams: Sequence[memoryview], src: Endpoint, now: float) -> OpenedBatch:
    """Decrypt transport messages in place (decrypt_into); other message types go through receive_datagram.
    The returned views alias the input buffers: consume them before reusing those buffers."""
    result = OpenedBatch()
    drops = device.drops
    reject_after_messages = device.timing.reject_after_messages
    reject_after_time = device.timing.reject_after_time
    index_table = device.index_table
    # Per keypair seen in this batch: [peer, bytes, had_data], applied once at the end.
    seen: dict[int, list] = {}
    cur_kp: Keypair | None = None
    cur: list = []
    for position, dg in enumerate(datagrams):
        n = len(dg)
        if n < m.MESSAGE_TRANSPORT_SIZE or dg[0] != m.MESSAGE_TRANSPORT_TYPE:
            result.events.extend(device.receive_datagram(dg, src, now))
            continue
        word, receiver, counter = _HEADER.unpack_from(dg, 0)
        if word != m.MESSAGE_TRANSPORT_TYPE:
            result.events.extend(device.receive_datagram(dg, src, now))
            continue
        entry = index_table.get(receiver)
        if entry is None or entry.keypair is None:
            drops[DropReason.UNKNOWN_INDEX] += 1
            continue
        kp = entry.keypair
        if now - kp.created >= reject_after_time:
            drops[DropReason.KEY_EXPIRED] += 1
            continue
        end = n - _TAG
        try:
            nonce = _NONCE_PREFIX + _U64.pack(counter)
            if _HAVE_INTO:
                kp.recv.decrypt_into(nonce, dg[16:], None, dg[16:end])
            else:
                dg[16:end] = kp.recv.decrypt(nonce, bytes(dg[16:]), None)
        except InvalidTag:
            drops[DropReason.DECRYPT_FAILED] += 1
            continue
        # Replay check only after authentication (whitepaper 5.4.6), else forged counters would move it.
        if not kp.replay.validate_counter(counter, reject_after_messages):
            drops[DropReason.REPLAY] += 1
            continue
        if kp is not cur_kp:
            cur_kp = kp
            cur = seen.setdefault(id(kp), [entry.peer, kp, 0, False])
        cur[2] += n
        if end == 16:
            continue  # keepalive
        cur[3] = True
        plain = dg[16:end]
        length = inner_packet_length(plain)
        if length is None:
            drops[DropReason.BAD_INNER_PACKET] += 1
            continue
        packet = plain[:length]
        peer = entry.peer
        if peer.allowed_ranges and not device._allowed(peer, packet):
            drops[DropReason.NOT_ALLOWED_IP] += 1
            continue
        result.delivered.append((peer.public_key, packet))
        result.indices.append(position)
    for peer, kp, size, had_data in seen.values():
        result.events.extend(device._after_authenticated_receive(peer, kp, src, size, now))
        if had_data:
            peer.timers.on_data_received(now)
    return result
