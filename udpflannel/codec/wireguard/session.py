"""The WireGuard device state machine: peers, index table, keypair rotation, timers and transport data.

Connects noise.py, cookie.py, replay.py and timers.py (wireguard-go device/{receive,send,timers,keypair}.go).
Drivers: `receive_datagram(data, src, now)`, `send(peer, payload, now)`, `handle_timer(now)`; output is a
list of events (Reply datagrams to send, Delivered payloads, Drop reasons). No sockets; the caller owns time.
Batch variants for the hot path are in batch.py.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import random
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag

from udpflannel.codec.wireguard import crypto, noise
from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.cookie import CookieChecker, CookieGenerator, RateLimiter, source_bytes
from udpflannel.codec.wireguard.events import (
    Delivered,
    Drop,
    DropReason,
    Endpoint,
    Event,
    HandshakeCompleted,
    Queued,
    Reply,
)
from udpflannel.codec.wireguard.keypairs import IndexTable, Keypair
from udpflannel.codec.wireguard.timers import PeerTimers, TimerKind, Timing

Rand = Callable[[int], bytes]
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_U64 = struct.Struct("<Q")
# Handshake messages seen within one second above which we ask for cookies (wireguard-go: a handshake queue
# 1/8 full); the state lasts UNDER_LOAD_AFTER_TIME.
UNDER_LOAD_HANDSHAKES_PER_SECOND = 128


@dataclass(slots=True)
class PeerStats:
    rx_bytes: int = 0
    tx_bytes: int = 0
    last_handshake: float | None = None  # on the caller's clock


@dataclass(slots=True)
class Peer:
    public_key: bytes
    handshake: noise.Handshake
    cookie: CookieGenerator
    timers: PeerTimers
    endpoint: Endpoint | None = None
    allowed_ips: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    # allowed_ips as (network, mask) integers per IP version (index 4 and 6), checked without ipaddress
    allowed_ranges: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    allowed_arrays: tuple | None = None  # allowed_ranges as numpy arrays, built by rows.py when first needed
    previous: Keypair | None = None
    current: Keypair | None = None
    next: Keypair | None = None
    staged: collections.deque[bytes] = field(default_factory=collections.deque)
    stats: PeerStats = field(default_factory=PeerStats)

    def set_allowed_ips(self, cidrs: Iterable[str]) -> None:
        """Inner source addresses this peer may send from (empty: not checked here)."""
        self.allowed_ips = [ipaddress.ip_network(c) for c in cidrs]
        self.allowed_ranges = {4: [], 6: []} if self.allowed_ips else {}
        self.allowed_arrays = None
        for n in self.allowed_ips:
            self.allowed_ranges[n.version].append((int(n.network_address), int(n.netmask)))


def inner_packet_length(payload: bytes | memoryview) -> int | None:
    """Length of the IPv4/IPv6 packet at the start of a decrypted payload (padding follows it)."""
    if len(payload) < 20:
        return None
    version = payload[0] >> 4
    if version == 4:
        n = (payload[2] << 8) | payload[3]
        return n if 20 <= n <= len(payload) else None
    if version == 6 and len(payload) >= 40:
        n = 40 + ((payload[4] << 8) | payload[5])
        return n if n <= len(payload) else None
    return None


class Device:
    """One WireGuard interface: our static key, our peers, the index table, the cookie checker."""

    def __init__(
        self,
        private_key: bytes,
        *,
        timing: Timing | None = None,
        rand: Rand = os.urandom,
        jitter: Callable[[], float] | None = None,
        wall_offset: float = 0.0,
        mtu: int = 0,
    ) -> None:
        """`wall_offset` turns the caller's clock into Unix time for TAI64N (unix = now + wall_offset);
        `mtu` caps the padding as wireguard-go does (0: pad every payload to 16)."""
        self.identity = noise.StaticIdentity.from_private(private_key)
        self.timing = timing or Timing()
        self.rand = rand
        self.jitter = jitter or random.Random(int.from_bytes(rand(8), "little")).random
        self.wall_offset = wall_offset
        self.mtu = mtu
        self.checker = CookieChecker.for_public_key(self.identity.public, rand)
        self.rate_limiter = RateLimiter()
        self.peers: dict[bytes, Peer] = {}
        self.index_table = IndexTable(rand)
        self.drops: collections.Counter[DropReason] = collections.Counter()
        self.force_under_load = False
        self._under_load_until = float("-inf")
        self._handshake_window: tuple[int, int] = (0, 0)  # (second, handshake messages seen in it)

    # -- configuration -----------------------------------------------------------------------------------

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        endpoint: Endpoint | None = None,
        persistent_keepalive: float = 0.0,
        allowed_ips: Iterable[str] = (),
    ) -> Peer:
        if public_key in self.peers:
            raise ValueError("peer already present")
        if len(public_key) != crypto.KEY_SIZE or (preshared_key and len(preshared_key) != crypto.KEY_SIZE):
            raise ValueError("public and preshared keys have 32 bytes")
        peer = Peer(
            public_key=public_key,
            handshake=noise.Handshake.for_peer(self.identity, public_key, preshared_key),
            cookie=CookieGenerator.for_public_key(public_key),
            timers=PeerTimers(self.timing, self.jitter, persistent_keepalive),
            endpoint=endpoint,
        )
        peer.set_allowed_ips(allowed_ips)
        self.peers[public_key] = peer
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is not None:
            self._zero_key_material(peer)

    # -- driver: datagrams from the network ---------------------------------------------------------------

    def receive_datagram(
        self, data: bytes | bytearray | memoryview, src: Endpoint, now: float
    ) -> list[Event]:
        kind = m.message_type(data)
        if kind == m.MESSAGE_TRANSPORT_TYPE:
            return self._receive_transport(data, src, now)
        if kind in (m.MESSAGE_INITIATION_TYPE, m.MESSAGE_RESPONSE_TYPE):
            return self._receive_handshake(kind, bytes(data), src, now)
        if kind == m.MESSAGE_COOKIE_REPLY_TYPE:
            return self._receive_cookie_reply(bytes(data), now)
        return [self._drop(DropReason.BAD_HEADER)]

    def _drop(self, reason: DropReason, n: int = 1) -> Drop:
        self.drops[reason] += n
        return Drop(reason)

    def under_load(self, now: float) -> bool:
        return self.force_under_load or now < self._under_load_until

    def _note_handshake(self, now: float) -> None:
        second, count = self._handshake_window
        count = count + 1 if int(now) == second else 1
        self._handshake_window = (int(now), count)
        if count > UNDER_LOAD_HANDSHAKES_PER_SECOND:
            self._under_load_until = now + m.UNDER_LOAD_AFTER_TIME

    def _receive_handshake(self, kind: int, data: bytes, src: Endpoint, now: float) -> list[Event]:
        size = m.MESSAGE_INITIATION_SIZE if kind == m.MESSAGE_INITIATION_TYPE else m.MESSAGE_RESPONSE_SIZE
        if len(data) != size:
            return [self._drop(DropReason.BAD_SIZE)]
        if not self.checker.check_mac1(data):
            return [self._drop(DropReason.BAD_MAC1)]
        self._note_handshake(now)
        if self.under_load(now):
            # Whitepaper 5.4.7: under load, only messages proving address ownership (mac2) are processed.
            src_bytes = source_bytes(src)
            if not self.checker.check_mac2(data, src_bytes, now):
                sender = int.from_bytes(data[4:8], "little")
                reply = self.checker.create_reply(data, sender, src_bytes, now)
                return [Reply(reply, src), self._drop(DropReason.COOKIE_REQUIRED)]
            if not self.rate_limiter.allow(src_bytes[:-2], now):
                return [self._drop(DropReason.RATE_LIMITED)]
        if kind == m.MESSAGE_INITIATION_TYPE:
            return self._receive_initiation(data, src, now)
        return self._receive_response(data, src, now)

    def _lookup_handshake(self, public_key: bytes) -> noise.Handshake | None:
        peer = self.peers.get(public_key)
        return peer.handshake if peer is not None else None

    def _receive_initiation(self, data: bytes, src: Endpoint, now: float) -> list[Event]:
        res = noise.consume_initiation(self.identity, data, self._lookup_handshake, now)
        if isinstance(res, DropReason):
            return [self._drop(res)]
        peer = self.peers[res.handshake.remote_static]
        peer.endpoint = src
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_received(now)
        hs = peer.handshake
        index = self.index_table.new_handshake_index(peer)
        response = noise.create_response(hs, index, crypto.generate_private_key(self.rand(32)))
        response = peer.cookie.add_macs(response, now)
        hs.last_sent_handshake = now
        self._begin_session(peer, noise.begin_session(hs), now)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_sent(now)
        peer.stats.tx_bytes += len(response)
        return [Reply(response, src)]

    def _receive_response(self, data: bytes, src: Endpoint, now: float) -> list[Event]:
        def lookup(index: int) -> noise.Handshake | None:
            entry = self.index_table.get(index)
            return entry.peer.handshake if entry is not None and entry.keypair is None else None

        res = noise.consume_response(self.identity, data, lookup)
        if isinstance(res, DropReason):
            return [self._drop(res)]
        peer = self.index_table[int.from_bytes(data[8:12], "little")].peer
        peer.endpoint = src
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_received(now)
        self._begin_session(peer, noise.begin_session(res), now)
        peer.timers.on_handshake_complete(now)
        peer.stats.last_handshake = now
        # The initiator confirms the session at once: staged packets, or a keepalive (whitepaper 6.5).
        return [HandshakeCompleted(peer.public_key, initiator=True), *self._send_keepalive(peer, now)]

    def _receive_cookie_reply(self, data: bytes, now: float) -> list[Event]:
        reply = m.decode_cookie_reply(data)
        if reply is None:
            return [self._drop(DropReason.BAD_SIZE)]
        entry = self.index_table.get(reply.receiver)
        if entry is None:
            return [self._drop(DropReason.UNKNOWN_INDEX)]
        if not entry.peer.cookie.consume_reply(reply, now):
            return [self._drop(DropReason.BAD_COOKIE_REPLY)]
        return []

    def _receive_transport(
        self, data: bytes | bytearray | memoryview, src: Endpoint, now: float
    ) -> list[Event]:
        if len(data) < m.MESSAGE_TRANSPORT_SIZE:
            return [self._drop(DropReason.BAD_HEADER)]
        receiver = int.from_bytes(data[4:8], "little")
        counter = _U64.unpack_from(data, m.MESSAGE_TRANSPORT_OFFSET_COUNTER)[0]
        entry = self.index_table.get(receiver)
        if entry is None or entry.keypair is None:
            return [self._drop(DropReason.UNKNOWN_INDEX)]
        kp, peer = entry.keypair, entry.peer
        if now - kp.created >= self.timing.reject_after_time:
            return [self._drop(DropReason.KEY_EXPIRED)]
        try:
            plain = kp.recv.decrypt(_NONCE_PREFIX + _U64.pack(counter), bytes(data[16:]), None)
        except InvalidTag:
            return [self._drop(DropReason.DECRYPT_FAILED)]
        # Replay check only after authentication (whitepaper 5.4.6), else forged counters would move it.
        if not kp.replay.validate_counter(counter, self.timing.reject_after_messages):
            return [self._drop(DropReason.REPLAY)]
        events = self._after_authenticated_receive(peer, kp, src, len(data), now)
        if not plain:
            return events  # keepalive
        peer.timers.on_data_received(now)
        event = self._deliver(peer, plain)
        events.append(event)
        return events

    def _after_authenticated_receive(
        self, peer: Peer, kp: Keypair, src: Endpoint, size: int, now: float
    ) -> list[Event]:
        peer.endpoint = src
        peer.stats.rx_bytes += size
        events: list[Event] = []
        if self.index_table.confirm_next(peer, kp):
            # First data under the responder's new keypair confirms the handshake: release what was staged.
            peer.timers.on_handshake_complete(now)
            peer.stats.last_handshake = now
            events.append(HandshakeCompleted(peer.public_key, initiator=False))
            events.extend(self._send_staged(peer, now))
        cur = peer.current
        if (
            cur is not None
            and cur.is_initiator
            and not peer.timers.sent_last_minute_handshake
            and now - cur.created > self.timing.rekey_on_receive_after
        ):
            peer.timers.sent_last_minute_handshake = True
            events.extend(self._send_initiation(peer, now, is_retry=False))
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_received(now)
        return events

    def _deliver(self, peer: Peer, plain: bytes) -> Event:
        n = inner_packet_length(plain)
        if n is None:
            return self._drop(DropReason.BAD_INNER_PACKET)
        payload = plain[:n]
        if peer.allowed_ranges and not self._allowed(peer, payload):
            return self._drop(DropReason.NOT_ALLOWED_IP)
        return Delivered(peer.public_key, payload)

    @staticmethod
    def _allowed(peer: Peer, packet: bytes | memoryview) -> bool:
        if packet[0] >> 4 == 4:
            src, ranges = int.from_bytes(packet[12:16], "big"), peer.allowed_ranges[4]
        else:
            src, ranges = int.from_bytes(packet[8:24], "big"), peer.allowed_ranges[6]
        for net, mask in ranges:  # noqa: SIM110 (a plain loop beats any(genexpr): once per packet)
            if src & mask == net:
                return True
        return False

    # -- driver: payloads from the TUN --------------------------------------------------------------------

    def send(self, public_key: bytes, payload: bytes, now: float) -> bytes | Queued | Drop:
        """One transport message for `payload`, or Queued (staged until a handshake completes; the initiation
        goes out from handle_timer, which next_timer() makes due at once)."""
        peer = self.peers[public_key]
        kp = self._sendable_keypair(peer, now)
        if kp is None:
            self._stage(peer, payload)
            peer.timers.arm(TimerKind.SEND_INITIATION, now)
            return Queued(public_key)
        out = self._seal(peer, kp, payload)
        self._after_send(peer, kp, bool(payload), len(out), now)
        return out

    def _sendable_keypair(self, peer: Peer, now: float) -> Keypair | None:
        kp = peer.current
        if (
            kp is None
            or kp.send_nonce >= self.timing.reject_after_messages
            or now - kp.created >= self.timing.reject_after_time
        ):
            return None
        return kp

    def _seal(self, peer: Peer, kp: Keypair, payload: bytes) -> bytes:
        counter = kp.send_nonce
        kp.send_nonce += 1
        pad = self.padded_length(len(payload)) - len(payload)
        header = m.encode_transport_header(kp.remote_index, counter)
        return header + kp.send.encrypt(_NONCE_PREFIX + _U64.pack(counter), payload + bytes(pad), None)

    def padded_length(self, n: int) -> int:
        """wireguard-go calculatePaddingSize: pad to 16 but never past the MTU."""
        if not self.mtu:
            return m.padded_length(n)
        last = n % self.mtu if n > self.mtu else n
        return n - last + min(m.padded_length(last), self.mtu)

    def _after_send(self, peer: Peer, kp: Keypair, is_data: bool, size: int, now: float) -> None:
        peer.stats.tx_bytes += size
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_sent(now)
        if is_data:
            peer.timers.on_data_sent(now)
        # keepKeyFreshSending: rekey after REKEY_AFTER_MESSAGES, or REKEY_AFTER_TIME if we initiated.
        if kp.send_nonce > self.timing.rekey_after_messages or (
            kp.is_initiator and now - kp.created > self.timing.rekey_after_time
        ):
            peer.timers.arm(TimerKind.SEND_INITIATION, now)

    def _stage(self, peer: Peer, payload: bytes) -> None:
        if len(peer.staged) >= m.QUEUE_STAGED_SIZE:
            peer.staged.popleft()  # wireguard-go drops the oldest staged packet
            self.drops[DropReason.NO_SESSION] += 1
        peer.staged.append(payload)

    def _send_staged(self, peer: Peer, now: float) -> list[Event]:
        if not peer.staged:
            return []
        kp = self._sendable_keypair(peer, now)
        if kp is None:
            return self._send_initiation(peer, now, is_retry=False)
        events: list[Event] = []
        while peer.staged:
            payload = peer.staged.popleft()
            out = self._seal(peer, kp, payload)
            self._after_send(peer, kp, bool(payload), len(out), now)
            events.append(Reply(out, peer.endpoint))
        return events

    def _send_keepalive(self, peer: Peer, now: float) -> list[Event]:
        if not peer.staged:
            peer.staged.append(b"")
        return self._send_staged(peer, now)

    def initiate(self, public_key: bytes, now: float) -> list[Event]:
        """Start a handshake with a peer now (subject to the one-per-REKEY_TIMEOUT limit)."""
        return self._send_initiation(self.peers[public_key], now, is_retry=False)

    def _send_initiation(self, peer: Peer, now: float, *, is_retry: bool) -> list[Event]:
        if not is_retry:
            peer.timers.handshake_attempts = 0
        hs = peer.handshake
        if now - hs.last_sent_handshake < self.timing.rekey_timeout or peer.endpoint is None:
            return []
        hs.last_sent_handshake = now
        index = self.index_table.new_handshake_index(peer)
        unix = now + self.wall_offset
        msg = noise.create_initiation(
            self.identity, hs, index, unix, crypto.generate_private_key(self.rand(32))
        )
        msg = peer.cookie.add_macs(msg, now)
        peer.timers.on_any_authenticated_packet_traversal(now)
        peer.timers.on_any_authenticated_packet_sent(now)
        peer.timers.on_handshake_initiated(now)
        peer.stats.tx_bytes += len(msg)
        return [Reply(msg, peer.endpoint)]

    # -- driver: time -------------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        deadlines = [d for p in self.peers.values() if (d := p.timers.next_deadline()) is not None]
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Event]:
        events: list[Event] = []
        for peer in list(self.peers.values()):
            for kind in peer.timers.pop_expired(now):
                events.extend(self._expired(peer, kind, now))
        return events

    def _expired(self, peer: Peer, kind: TimerKind, now: float) -> list[Event]:
        t = peer.timers
        if kind is TimerKind.SEND_INITIATION or kind is TimerKind.NEW_HANDSHAKE:
            return self._send_initiation(peer, now, is_retry=False)
        if kind is TimerKind.RETRANSMIT_HANDSHAKE:
            if t.handshake_attempts > self.timing.max_timer_handshakes:
                # Give up after REKEY_ATTEMPT_TIME: forget staged packets, zero keys later.
                t.disarm(TimerKind.SEND_KEEPALIVE)
                if peer.staged:
                    self.drops[DropReason.NO_SESSION] += len(peer.staged)
                    peer.staged.clear()
                if not t.pending(TimerKind.ZERO_KEY_MATERIAL):
                    t.arm(TimerKind.ZERO_KEY_MATERIAL, now + self.timing.zero_key_material_after)
                return []
            t.handshake_attempts += 1
            # Bypass the REKEY_TIMEOUT limit: the retransmit timer itself runs at that pace.
            peer.handshake.last_sent_handshake = float("-inf")
            return self._send_initiation(peer, now, is_retry=True)
        if kind is TimerKind.SEND_KEEPALIVE:
            events = self._send_keepalive(peer, now)
            if t.need_another_keepalive:
                t.need_another_keepalive = False
                t.arm(TimerKind.SEND_KEEPALIVE, now + self.timing.keepalive_timeout)
            return events
        if kind is TimerKind.PERSISTENT_KEEPALIVE:
            return self._send_keepalive(peer, now) if t.persistent_keepalive_interval > 0 else []
        if kind is TimerKind.ZERO_KEY_MATERIAL:
            self._zero_key_material(peer)
        return []

    # -- keypairs ----------------------------------------------------------------------------------------

    def _begin_session(self, peer: Peer, keys: noise.SessionKeys, now: float) -> None:
        self.index_table.install(peer, keys, now)
        peer.timers.on_session_derived(now)

    def _zero_key_material(self, peer: Peer) -> None:
        self.index_table.forget(peer)
        if peer.staged:
            self.drops[DropReason.NO_SESSION] += len(peer.staged)
            peer.staged.clear()
