"""Noise IKpsk2 handshake maths (whitepaper 5.4, wireguard-go device/noise-protocol.go).

create_initiation/consume_initiation, create_response/consume_response and begin_session. The caller picks
indices and ephemeral keys and passes the time; macs are filled in by cookie.py. No sockets, no clock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from udpflannel.codec.wireguard import crypto
from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.events import DropReason

INITIAL_CHAIN_KEY = crypto.hash_(m.CONSTRUCTION)
INITIAL_HASH = crypto.hash_(INITIAL_CHAIN_KEY + m.IDENTIFIER)
_EMPTY_MACS = bytes(2 * m.MAC_SIZE)


class HandshakeState(enum.Enum):
    ZEROED = "zeroed"
    INITIATION_CREATED = "initiation_created"
    INITIATION_CONSUMED = "initiation_consumed"
    RESPONSE_CREATED = "response_created"
    RESPONSE_CONSUMED = "response_consumed"


@dataclass(frozen=True, slots=True)
class StaticIdentity:
    private: bytes
    public: bytes
    # The key object, built once: every handshake does two DHs with our static key.
    key: X25519PrivateKey = field(repr=False, compare=False)

    @classmethod
    def from_private(cls, private: bytes) -> StaticIdentity:
        if len(private) != crypto.KEY_SIZE:
            raise ValueError("a WireGuard private key has 32 bytes")
        key = crypto.private_key_object(private)
        return cls(private=private, public=crypto.public_key_of(key), key=key)


@dataclass(slots=True)
class Handshake:
    """One peer's handshake: the transcript so far plus the replay/flood memory of the responder side."""

    remote_static: bytes
    # DH(our static, their static); None when their key is a low-order point (no handshake possible).
    precomputed_static_static: bytes | None
    preshared_key: bytes = crypto.ZERO_KEY
    state: HandshakeState = HandshakeState.ZEROED
    hash: bytes = b""
    chaining_key: bytes = b""
    local_ephemeral: bytes = b""
    # Its key object, kept from creation so consuming the response does not build it again (~40 us).
    local_ephemeral_key: X25519PrivateKey | None = None
    remote_ephemeral: bytes = b""
    local_index: int = 0
    remote_index: int = 0
    last_timestamp: bytes = bytes(crypto.TAI64N_SIZE)
    last_initiation_consumed: float = -math.inf
    last_sent_handshake: float = -math.inf

    @classmethod
    def for_peer(cls, local: StaticIdentity, remote_static: bytes, psk: bytes | None = None) -> Handshake:
        return cls(
            remote_static=remote_static,
            precomputed_static_static=crypto.dh(local.key, remote_static),
            preshared_key=psk or crypto.ZERO_KEY,
        )

    def clear(self) -> None:
        self.state = HandshakeState.ZEROED
        self.hash = self.chaining_key = self.local_ephemeral = self.remote_ephemeral = b""
        self.local_ephemeral_key = None
        self.local_index = 0


@dataclass(frozen=True, slots=True)
class SessionKeys:
    send_key: bytes
    recv_key: bytes
    local_index: int
    remote_index: int
    is_initiator: bool


@dataclass(slots=True)
class _Transcript:
    hash: bytes
    chaining_key: bytes

    def mix_hash(self, data: bytes) -> None:
        self.hash = crypto.hash_(self.hash + data)

    def mix_key(self, data: bytes) -> None:
        self.chaining_key = crypto.kdf1(self.chaining_key, data)


def create_initiation(
    local: StaticIdentity, hs: Handshake, local_index: int, unix_time: float, ephemeral_private: bytes
) -> bytes:
    """Message 1 with zero macs. Raises ValueError if the peer's static key is unusable (caller misuse)."""
    if hs.precomputed_static_static is None:
        raise ValueError("peer static key is a low-order point: no handshake is possible")
    t = _Transcript(hash=crypto.hash_(INITIAL_HASH + hs.remote_static), chaining_key=INITIAL_CHAIN_KEY)
    ephemeral = crypto.private_key_object(ephemeral_private)
    ephemeral_public = crypto.public_key_of(ephemeral)
    t.mix_key(ephemeral_public)
    t.mix_hash(ephemeral_public)
    ss = crypto.dh(ephemeral, hs.remote_static)
    if ss is None:
        raise ValueError("peer static key is a low-order point")
    t.chaining_key, key = crypto.kdf2(t.chaining_key, ss)
    enc_static = crypto.aead_encrypt(key, 0, local.public, t.hash)
    t.mix_hash(enc_static)
    t.chaining_key, key = crypto.kdf2(t.chaining_key, hs.precomputed_static_static)
    enc_timestamp = crypto.aead_encrypt(key, 0, crypto.tai64n(unix_time), t.hash)
    t.mix_hash(enc_timestamp)
    hs.hash, hs.chaining_key = t.hash, t.chaining_key
    hs.local_ephemeral, hs.local_ephemeral_key = ephemeral_private, ephemeral
    hs.local_index = local_index
    hs.state = HandshakeState.INITIATION_CREATED
    return m.encode_initiation(
        m.Initiation(
            sender=local_index,
            ephemeral=ephemeral_public,
            enc_static=enc_static,
            enc_timestamp=enc_timestamp,
            mac1=_EMPTY_MACS[:16],
            mac2=_EMPTY_MACS[16:],
        )
    )


@dataclass(frozen=True, slots=True)
class ConsumedInitiation:
    handshake: Handshake
    timestamp: bytes
    sender: int


def consume_initiation(
    local: StaticIdentity,
    data: bytes | bytearray | memoryview,
    lookup: Callable[[bytes], Handshake | None],
    now: float,
) -> ConsumedInitiation | DropReason:
    """Decrypt message 1; `lookup` maps the initiator's static key to its Handshake. Updates that handshake
    only when the whole message verifies and its timestamp is fresh (wireguard-go
    ConsumeMessageInitiation)."""
    msg = m.decode_initiation(data)
    if msg is None:
        return DropReason.BAD_SIZE
    t = _Transcript(hash=crypto.hash_(INITIAL_HASH + local.public), chaining_key=INITIAL_CHAIN_KEY)
    t.mix_hash(msg.ephemeral)
    t.mix_key(msg.ephemeral)
    ss = crypto.dh(local.key, msg.ephemeral)
    if ss is None:
        return DropReason.HANDSHAKE_FAILED
    t.chaining_key, key = crypto.kdf2(t.chaining_key, ss)
    peer_static = crypto.aead_decrypt(key, 0, msg.enc_static, t.hash)
    if peer_static is None:
        return DropReason.DECRYPT_FAILED
    t.mix_hash(msg.enc_static)
    hs = lookup(peer_static)
    if hs is None:
        return DropReason.UNKNOWN_PEER
    if hs.precomputed_static_static is None:
        return DropReason.HANDSHAKE_FAILED
    chaining_key, key = crypto.kdf2(t.chaining_key, hs.precomputed_static_static)
    timestamp = crypto.aead_decrypt(key, 0, msg.enc_timestamp, t.hash)
    if timestamp is None:
        return DropReason.DECRYPT_FAILED
    t.chaining_key = chaining_key
    t.mix_hash(msg.enc_timestamp)
    # Whitepaper 5.1: the timestamp must strictly increase, and one initiation per 20 ms at most.
    if timestamp <= hs.last_timestamp:
        return DropReason.STALE_TIMESTAMP
    if now - hs.last_initiation_consumed <= m.HANDSHAKE_INITIATION_RATE:
        return DropReason.INITIATION_FLOOD
    hs.hash, hs.chaining_key = t.hash, t.chaining_key
    hs.remote_index = msg.sender
    hs.remote_ephemeral = msg.ephemeral
    hs.last_timestamp = timestamp
    hs.last_initiation_consumed = max(hs.last_initiation_consumed, now)
    hs.state = HandshakeState.INITIATION_CONSUMED
    return ConsumedInitiation(handshake=hs, timestamp=timestamp, sender=msg.sender)


def create_response(hs: Handshake, local_index: int, ephemeral_private: bytes) -> bytes:
    """Message 2 with zero macs, for a handshake whose initiation we consumed. Raises ValueError otherwise."""
    if hs.state is not HandshakeState.INITIATION_CONSUMED:
        raise ValueError(f"create_response in state {hs.state.value}")
    t = _Transcript(hash=hs.hash, chaining_key=hs.chaining_key)
    ephemeral = crypto.private_key_object(ephemeral_private)
    ephemeral_public = crypto.public_key_of(ephemeral)
    t.mix_hash(ephemeral_public)
    t.mix_key(ephemeral_public)
    ss1 = crypto.dh(ephemeral, hs.remote_ephemeral)
    ss2 = crypto.dh(ephemeral, hs.remote_static)
    if ss1 is None or ss2 is None:
        raise ValueError("peer ephemeral or static key is a low-order point")
    t.mix_key(ss1)
    t.mix_key(ss2)
    t.chaining_key, tau, key = crypto.kdf3(t.chaining_key, hs.preshared_key)
    t.mix_hash(tau)
    enc_empty = crypto.aead_encrypt(key, 0, b"", t.hash)
    t.mix_hash(enc_empty)
    hs.hash, hs.chaining_key = t.hash, t.chaining_key
    hs.local_ephemeral, hs.local_ephemeral_key = ephemeral_private, ephemeral
    hs.local_index = local_index
    hs.state = HandshakeState.RESPONSE_CREATED
    return m.encode_response(
        m.Response(
            sender=local_index,
            receiver=hs.remote_index,
            ephemeral=ephemeral_public,
            enc_empty=enc_empty,
            mac1=_EMPTY_MACS[:16],
            mac2=_EMPTY_MACS[16:],
        )
    )


def consume_response(
    local: StaticIdentity,
    data: bytes | bytearray | memoryview,
    lookup: Callable[[int], Handshake | None],
) -> Handshake | DropReason:
    """Verify message 2 against the handshake that owns its receiver index; on success the handshake is
    RESPONSE_CONSUMED and ready for begin_session."""
    msg = m.decode_response(data)
    if msg is None:
        return DropReason.BAD_SIZE
    hs = lookup(msg.receiver)
    if hs is None:
        return DropReason.UNKNOWN_INDEX
    if hs.state is not HandshakeState.INITIATION_CREATED:
        return DropReason.HANDSHAKE_FAILED
    t = _Transcript(hash=hs.hash, chaining_key=hs.chaining_key)
    t.mix_hash(msg.ephemeral)
    t.mix_key(msg.ephemeral)
    ss1 = crypto.dh(hs.local_ephemeral_key or hs.local_ephemeral, msg.ephemeral)
    ss2 = crypto.dh(local.key, msg.ephemeral)
    if ss1 is None or ss2 is None:
        return DropReason.HANDSHAKE_FAILED
    t.mix_key(ss1)
    t.mix_key(ss2)
    t.chaining_key, tau, key = crypto.kdf3(t.chaining_key, hs.preshared_key)
    t.mix_hash(tau)
    if crypto.aead_decrypt(key, 0, msg.enc_empty, t.hash) is None:
        return DropReason.DECRYPT_FAILED
    t.mix_hash(msg.enc_empty)
    hs.hash, hs.chaining_key = t.hash, t.chaining_key
    hs.remote_index = msg.sender
    hs.state = HandshakeState.RESPONSE_CONSUMED
    return hs


def begin_session(hs: Handshake) -> SessionKeys:
    """Derive transport keys and zero the handshake (wireguard-go BeginSymmetricSession)."""
    if hs.state is HandshakeState.RESPONSE_CONSUMED:
        send_key, recv_key = crypto.kdf2(hs.chaining_key, b"")
        initiator = True
    elif hs.state is HandshakeState.RESPONSE_CREATED:
        recv_key, send_key = crypto.kdf2(hs.chaining_key, b"")
        initiator = False
    else:
        raise ValueError(f"begin_session in state {hs.state.value}")
    keys = SessionKeys(
        send_key=send_key,
        recv_key=recv_key,
        local_index=hs.local_index,
        remote_index=hs.remote_index,
        is_initiator=initiator,
    )
    hs.clear()
    return keys
