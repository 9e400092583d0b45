"""Keypair rotation and the index table (wireguard-go BeginSymmetricSession / ReceivedWithKeypair)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from wg_helpers import PRIV_A, PRIV_B, det_rand

from udpflannel.codec.wireguard import crypto, noise
from udpflannel.codec.wireguard.keypairs import IndexTable, Keypair


@dataclass
class FakePeer:
    handshake: noise.Handshake
    previous: Keypair | None = None
    current: Keypair | None = None
    next: Keypair | None = None


def keys(index: int, initiator: bool) -> noise.SessionKeys:
    return noise.SessionKeys(bytes(32), bytes([1]) * 32, index, index + 1000, initiator)


@pytest.fixture
def setup():
    a = noise.StaticIdentity.from_private(PRIV_A)
    peer = FakePeer(noise.Handshake.for_peer(a, crypto.public_key(PRIV_B)))
    return IndexTable(det_rand(b"t")), peer


def test_initiator_rotates_current_to_previous(setup) -> None:
    table, peer = setup
    k1 = table.install(peer, keys(1, True), 0.0)
    k2 = table.install(peer, keys(2, True), 1.0)
    assert (peer.previous, peer.current, peer.next) == (k1, k2, None)
    k3 = table.install(peer, keys(3, True), 2.0)
    assert (peer.previous, peer.current) == (k2, k3)
    assert set(table) == {2, 3}  # k1's index released
    assert table[3].keypair is k3 and table[3].peer is peer and k3.created == 2.0


def test_responder_waits_for_confirmation(setup) -> None:
    table, peer = setup
    k1 = table.install(peer, keys(1, True), 0.0)
    k2 = table.install(peer, keys(2, False), 1.0)
    assert (peer.previous, peer.current, peer.next) == (None, k1, k2)
    assert not table.confirm_next(peer, k1)
    assert table.confirm_next(peer, k2)
    assert (peer.previous, peer.current, peer.next) == (k1, k2, None)


def test_initiator_over_pending_next(setup) -> None:
    table, peer = setup
    k1 = table.install(peer, keys(1, True), 0.0)
    k2 = table.install(peer, keys(2, False), 1.0)  # responder keypair never confirmed
    k3 = table.install(peer, keys(3, True), 2.0)
    # wireguard-go: previous <- next, the old current is deleted.
    assert (peer.previous, peer.current, peer.next) == (k2, k3, None)
    assert 1 not in table and k1.local_index == 1


def test_handshake_index_replaced_and_forget(setup) -> None:
    table, peer = setup
    i1 = table.new_handshake_index(peer)
    peer.handshake.local_index = i1
    i2 = table.new_handshake_index(peer)
    assert i1 not in table and table[i2].keypair is None
    peer.handshake.local_index = i2
    table.install(peer, keys(5, True), 0.0)
    table.forget(peer)
    assert table == {} and peer.current is None and peer.handshake.state is noise.HandshakeState.ZEROED


def test_broken_random_source_is_a_bug(setup) -> None:
    _, peer = setup
    stuck = IndexTable(lambda n: bytes(n))  # always index 0
    assert stuck.new_handshake_index(peer) == 0
    with pytest.raises(RuntimeError, match="random source"):
        stuck.new_index()
