"""Session keypairs and the index table: which local index names a peer's handshake or one of its keypairs,
and the previous/current/next rotation (wireguard-go device/keypair.go, indextable.go, noise-protocol.go
BeginSymmetricSession and peer.go ReceivedWithKeypair). No sockets, no clock: `now` is passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from udpflannel.codec.wireguard import noise
from udpflannel.codec.wireguard.replay import Filter

MAX_INDEX_TRIES = 64


@dataclass(slots=True)
class Keypair:
    send: ChaCha20Poly1305
    recv: ChaCha20Poly1305
    created: float
    is_initiator: bool
    local_index: int
    remote_index: int
    send_nonce: int = 0
    replay: Filter = field(default_factory=Filter)


class KeypairHolder(Protocol):
    """What rotation needs of a peer (session.Peer)."""

    handshake: noise.Handshake
    previous: Keypair | None
    current: Keypair | None
    next: Keypair | None


@dataclass(slots=True)
class IndexEntry:
    peer: Any  # session.Peer
    keypair: Keypair | None  # None: the index names the peer's in-progress handshake


class IndexTable(dict[int, IndexEntry]):
    """Local index -> entry. Indices are random u32s (from the injected `rand`), unique in the table."""

    def __init__(self, rand: Callable[[int], bytes]) -> None:
        super().__init__()
        self.rand = rand

    def new_index(self) -> int:
        for _ in range(MAX_INDEX_TRIES):
            index = int.from_bytes(self.rand(4), "little")
            if index not in self:
                return index
        raise RuntimeError("could not find a free session index in 64 tries: the random source is broken")

    def new_handshake_index(self, peer: KeypairHolder) -> int:
        """A fresh index for the peer's next handshake message; the previous handshake index is released."""
        self._release_handshake(peer)
        index = self.new_index()
        self[index] = IndexEntry(peer, None)
        return index

    def _release_handshake(self, peer: KeypairHolder) -> None:
        old = self.get(peer.handshake.local_index)
        if old is not None and old.keypair is None and old.peer is peer:
            del self[peer.handshake.local_index]

    def drop(self, kp: Keypair | None) -> None:
        if kp is not None:
            entry = self.get(kp.local_index)
            if entry is not None and entry.keypair is kp:
                del self[kp.local_index]

    def install(self, peer: KeypairHolder, keys: noise.SessionKeys, now: float) -> Keypair:
        """A keypair from a finished handshake, rotated in as wireguard-go BeginSymmetricSession does: the
        initiator uses it at once; the responder keeps it as `next` until the initiator's first packet
        under it arrives (confirm_next)."""
        kp = Keypair(
            send=ChaCha20Poly1305(keys.send_key),
            recv=ChaCha20Poly1305(keys.recv_key),
            created=now,
            is_initiator=keys.is_initiator,
            local_index=keys.local_index,
            remote_index=keys.remote_index,
        )
        self[keys.local_index] = IndexEntry(peer, kp)
        if kp.is_initiator:
            old_previous = peer.previous
            if peer.next is not None:
                self.drop(peer.current)
                peer.previous, peer.next = peer.next, None
            else:
                peer.previous = peer.current
            self.drop(old_previous)
            peer.current = kp
        else:
            self.drop(peer.next)
            self.drop(peer.previous)
            peer.next, peer.previous = kp, None
        return kp

    def confirm_next(self, peer: KeypairHolder, kp: Keypair) -> bool:
        """wireguard-go ReceivedWithKeypair: data under `next` makes it current. True if it rotated."""
        if kp is not peer.next:
            return False
        self.drop(peer.previous)
        peer.previous, peer.current, peer.next = peer.current, kp, None
        return True

    def forget(self, peer: KeypairHolder) -> None:
        """Drop every keypair of the peer and its handshake index (key zeroing, peer removal)."""
        for kp in (peer.previous, peer.current, peer.next):
            self.drop(kp)
        peer.previous = peer.current = peer.next = None
        self._release_handshake(peer)
        peer.handshake.clear()
