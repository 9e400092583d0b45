"""Shared helpers for the WireGuard codec tests: fixed keys, deterministic randomness, a fake wire."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from udpflannel.codec.wireguard import crypto
from udpflannel.codec.wireguard.events import Delivered, Event, HandshakeCompleted, Reply
from udpflannel.codec.wireguard.session import Device
from udpflannel.codec.wireguard.timers import Timing

ENDPOINT_A = ("198.18.0.1", 51820)
ENDPOINT_B = ("198.18.0.2", 51820)
PRIV_A = crypto.generate_private_key(hashlib.blake2s(b"test key A").digest())
PRIV_B = crypto.generate_private_key(hashlib.blake2s(b"test key B").digest())
PSK = hashlib.blake2s(b"test psk").digest()


def det_rand(seed: bytes) -> Callable[[int], bytes]:
    """A deterministic random source (BLAKE2s in counter mode) so tests are reproducible."""
    counter = itertools.count()

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.blake2s(seed + struct.pack("<Q", next(counter))).digest()
        return out[:n]

    return rand


def ipv4_packet(
    payload_len: int, src: str = "198.19.1.1", dst: str = "198.19.2.1", fill: int = 0xAB
) -> bytes:
    """A minimal IPv4 packet (header checksum left zero: the codec does not look at it)."""

    total = 20 + payload_len
    hdr = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return hdr + bytes([fill]) * payload_len


@dataclass
class Pair:
    """Two devices joined by a fake wire: `deliver` carries Reply datagrams across until quiet."""

    a: Device
    b: Device
    now: float = 1000.0
    received: dict[str, list[Event]] = field(default_factory=lambda: {"a": [], "b": []})

    def other(self, dev: Device) -> tuple[Device, tuple[str, int], str]:
        return (self.b, ENDPOINT_A, "b") if dev is self.a else (self.a, ENDPOINT_B, "a")

    def deliver(self, sender: Device, events: list[Event], max_rounds: int = 20) -> None:
        pending = [(sender, e) for e in events]
        for _ in range(max_rounds):
            if not pending:
                return
            nxt = []
            for src_dev, ev in pending:
                if not isinstance(ev, Reply):
                    continue
                dst, src_ep, name = self.other(src_dev)
                out = dst.receive_datagram(ev.data, src_ep, self.now)
                self.received[name].extend(out)
                nxt.extend((dst, e) for e in out)
            pending = nxt
        raise AssertionError("wire did not go quiet")

    def send(self, sender: Device, payload: bytes) -> None:
        peer_key = self.b.identity.public if sender is self.a else self.a.identity.public
        out = sender.send(peer_key, payload, self.now)
        if isinstance(out, bytes):
            self.deliver(sender, [Reply(out, None)])
        else:
            self.tick(0.0)

    def tick(self, dt: float) -> None:
        """Advance time and run both devices' due timers (in order of their deadlines)."""
        target = self.now + dt
        for _ in range(10_000):
            due = [
                (d, dev) for dev in (self.a, self.b) if (d := dev.next_timer()) is not None and d <= target
            ]
            if not due:
                break
            when, dev = min(due, key=lambda x: x[0])
            self.now = max(self.now, when)
            self.deliver(dev, dev.handle_timer(self.now))
        else:
            raise AssertionError("timers did not settle")
        self.now = target

    def delivered(self, name: str) -> list[bytes]:
        return [e.payload for e in self.received[name] if isinstance(e, Delivered)]

    def completed(self, name: str) -> list[HandshakeCompleted]:
        return [e for e in self.received[name] if isinstance(e, HandshakeCompleted)]


def make_pair(timing: Timing | None = None, psk: bytes | None = PSK, keepalive: float = 0.0) -> Pair:
    a = Device(PRIV_A, timing=timing, rand=det_rand(b"a"), jitter=lambda: 0.0, wall_offset=1.7e9)
    b = Device(PRIV_B, timing=timing, rand=det_rand(b"b"), jitter=lambda: 0.0, wall_offset=1.7e9)
    a.add_peer(b.identity.public, preshared_key=psk, endpoint=ENDPOINT_B, persistent_keepalive=keepalive)
    b.add_peer(a.identity.public, preshared_key=psk, endpoint=ENDPOINT_A, persistent_keepalive=keepalive)
    return Pair(a, b)
