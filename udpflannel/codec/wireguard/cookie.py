"""mac1/mac2, cookie replies and the under-load rate limiter (whitepaper 5.4.4 and 5.4.7, wireguard-go
device/cookie.go and ratelimiter/).

Randomness (cookie secret, reply nonce) comes from an injected `rand(n) -> bytes`; time is passed in.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from udpflannel.codec.wireguard import crypto
from udpflannel.codec.wireguard import messages as m

Rand = Callable[[int], bytes]

# Rate limiter of handshakes per source IP while under load (wireguard-go ratelimiter/ratelimiter.go).
RATELIMIT_PACKETS_PER_SECOND = 20
RATELIMIT_BURST = 5
RATELIMIT_GC_INTERVAL = 1.0


def mac1_key(public: bytes) -> bytes:
    return crypto.hash_(m.LABEL_MAC1 + public)


def cookie_key(public: bytes) -> bytes:
    return crypto.hash_(m.LABEL_COOKIE + public)


def source_bytes(endpoint: tuple) -> bytes:
    """The bytes a cookie binds to: IP address then port, as wireguard-go's netip.AddrPort.MarshalBinary
    (little-endian port). Only the responder ever computes it, so the layout is ours to pick."""
    host, port = endpoint[0], endpoint[1]
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.packed + int(port).to_bytes(2, "little")


def _mac_offsets(msg: bytes | bytearray | memoryview) -> tuple[int, int]:
    smac2 = len(msg) - m.MAC_SIZE
    return smac2 - m.MAC_SIZE, smac2


@dataclass(slots=True)
class CookieChecker:
    """Responder side: verifies mac1/mac2 of handshake messages sent to us and makes cookie replies."""

    mac1_key: bytes
    encryption_key: bytes
    rand: Rand
    secret: bytes = b""
    secret_set: float = -math.inf

    @classmethod
    def for_public_key(cls, public: bytes, rand: Rand) -> CookieChecker:
        return cls(mac1_key=mac1_key(public), encryption_key=cookie_key(public), rand=rand)

    def check_mac1(self, msg: bytes | bytearray | memoryview) -> bool:
        smac1, smac2 = _mac_offsets(msg)
        if smac1 < 0:
            return False
        expected = crypto.mac(self.mac1_key, msg[:smac1])
        return hmac.compare_digest(expected, bytes(msg[smac1:smac2]))

    def check_mac2(self, msg: bytes | bytearray | memoryview, src: bytes, now: float) -> bool:
        smac1, smac2 = _mac_offsets(msg)
        if smac1 < 0 or now - self.secret_set > m.COOKIE_REFRESH_TIME:
            return False
        cookie = crypto.mac(self.secret, src)
        expected = crypto.mac(cookie, msg[:smac2])
        return hmac.compare_digest(expected, bytes(msg[smac2:]))

    def create_reply(
        self, msg: bytes | bytearray | memoryview, receiver: int, src: bytes, now: float
    ) -> bytes:
        """A cookie reply to `msg` (a handshake message with a valid mac1) from `src`."""
        if now - self.secret_set > m.COOKIE_REFRESH_TIME:
            # The secret rotates every 120 s so a cookie is only good for that long.
            self.secret = self.rand(crypto.KEY_SIZE)
            self.secret_set = now
        cookie = crypto.mac(self.secret, src)
        smac1, smac2 = _mac_offsets(msg)
        nonce = self.rand(crypto.XNONCE_SIZE)
        enc = crypto.xaead_encrypt(self.encryption_key, nonce, cookie, bytes(msg[smac1:smac2]))
        return m.encode_cookie_reply(m.CookieReply(receiver=receiver, nonce=nonce, enc_cookie=enc))


@dataclass(slots=True)
class CookieGenerator:
    """Initiator side, one per peer: fills mac1/mac2 of what we send and keeps the cookie the peer gave us."""

    mac1_key: bytes
    encryption_key: bytes
    cookie: bytes = b""
    cookie_set: float = -math.inf
    last_mac1: bytes | None = None

    @classmethod
    def for_public_key(cls, peer_public: bytes) -> CookieGenerator:
        return cls(mac1_key=mac1_key(peer_public), encryption_key=cookie_key(peer_public))

    def add_macs(self, msg: bytes, now: float) -> bytes:
        """`msg` with mac1 (and mac2 if we hold a cookie younger than COOKIE_REFRESH_TIME) filled in."""
        smac1, smac2 = _mac_offsets(msg)
        out = bytearray(msg)
        mac1 = crypto.mac(self.mac1_key, out[:smac1])
        out[smac1:smac2] = mac1
        self.last_mac1 = mac1
        if now - self.cookie_set <= m.COOKIE_REFRESH_TIME and self.cookie:
            out[smac2:] = crypto.mac(self.cookie, out[:smac2])
        return bytes(out)

    def consume_reply(self, reply: m.CookieReply, now: float) -> bool:
        """Store the cookie of a reply to the last message we sent; False if it does not decrypt."""
        if self.last_mac1 is None:
            return False
        cookie = crypto.xaead_decrypt(self.encryption_key, reply.nonce, reply.enc_cookie, self.last_mac1)
        if cookie is None:
            return False
        self.cookie = cookie
        self.cookie_set = now
        return True


@dataclass(slots=True)
class _Bucket:
    tokens: float
    last: float


@dataclass(slots=True)
class RateLimiter:
    """Token bucket per source IP: 20 handshakes/s, burst 5 (wireguard-go ratelimiter)."""

    rate: float = RATELIMIT_PACKETS_PER_SECOND
    burst: int = RATELIMIT_BURST
    buckets: dict[bytes, _Bucket] = field(default_factory=dict)
    last_gc: float = -math.inf

    def allow(self, ip: bytes, now: float) -> bool:
        if now - self.last_gc > RATELIMIT_GC_INTERVAL:
            self.buckets = {k: b for k, b in self.buckets.items() if now - b.last <= RATELIMIT_GC_INTERVAL}
            self.last_gc = now
        cost = 1.0 / self.rate
        max_tokens = cost * self.burst
        bucket = self.buckets.get(ip)
        if bucket is None:
            self.buckets[ip] = _Bucket(tokens=max_tokens - cost, last=now)
            return True
        bucket.tokens = min(max_tokens, bucket.tokens + max(0.0, now - bucket.last))
        bucket.last = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return True
        return False
