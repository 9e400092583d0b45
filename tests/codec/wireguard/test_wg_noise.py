"""Noise IKpsk2 with fixed keys: both sides derive the same transport keys; state rules hold."""

from __future__ import annotations

import pytest
from wg_helpers import PRIV_A, PRIV_B, PSK

from udpflannel.codec.wireguard import crypto, noise
from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.events import DropReason

EPH_A = crypto.generate_private_key(bytes(range(32)))
EPH_B = crypto.generate_private_key(bytes(range(32, 64)))
A = noise.StaticIdentity.from_private(PRIV_A)
B = noise.StaticIdentity.from_private(PRIV_B)


def run_handshake(psk_a: bytes | None = PSK, psk_b: bytes | None = PSK):
    hs_a = noise.Handshake.for_peer(A, B.public, psk_a)
    hs_b = noise.Handshake.for_peer(B, A.public, psk_b)
    init = noise.create_initiation(A, hs_a, 111, 1_700_000_000.0, EPH_A)
    consumed = noise.consume_initiation(B, init, lambda pk: hs_b if pk == A.public else None, 5.0)
    assert isinstance(consumed, noise.ConsumedInitiation)
    resp = noise.create_response(hs_b, 222, EPH_B)
    got = noise.consume_response(A, resp, lambda idx: hs_a if idx == 111 else None)
    return hs_a, hs_b, init, resp, got


def test_initial_constants() -> None:
    assert crypto.hash_(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s") == noise.INITIAL_CHAIN_KEY
    assert crypto.hash_(noise.INITIAL_CHAIN_KEY + b"WireGuard v1 zx2c4 Jason@zx2c4.com") == noise.INITIAL_HASH


def test_handshake_derives_matching_keys() -> None:
    hs_a, hs_b, init, resp, got = run_handshake()
    assert got is hs_a and hs_a.state is noise.HandshakeState.RESPONSE_CONSUMED
    assert hs_a.hash == hs_b.hash and hs_a.chaining_key == hs_b.chaining_key
    ka, kb = noise.begin_session(hs_a), noise.begin_session(hs_b)
    assert ka.send_key == kb.recv_key and ka.recv_key == kb.send_key and ka.send_key != ka.recv_key
    assert (ka.local_index, ka.remote_index, kb.local_index, kb.remote_index) == (111, 222, 222, 111)
    assert ka.is_initiator and not kb.is_initiator
    assert hs_a.state is noise.HandshakeState.ZEROED and hs_a.chaining_key == b""
    # Fixed keys, fixed time: the messages are deterministic apart from nothing at all.
    _, _, init2, resp2, _ = run_handshake()
    assert (init, resp) == (init2, resp2)
    assert len(init) == m.MESSAGE_INITIATION_SIZE and len(resp) == m.MESSAGE_RESPONSE_SIZE
    assert init[m.INIT_OFFSET_EPHEMERAL : m.INIT_OFFSET_STATIC] == crypto.public_key(EPH_A)


def test_psk_changes_keys_and_mismatch_fails() -> None:
    hs_a, _, _, _, _ = run_handshake(psk_a=None, psk_b=None)
    k_nopsk = noise.begin_session(hs_a)
    hs_a, _, _, _, _ = run_handshake()
    assert noise.begin_session(hs_a).send_key != k_nopsk.send_key
    _, _, _, _, got = run_handshake(psk_a=PSK, psk_b=None)
    assert got is DropReason.DECRYPT_FAILED


def test_timestamp_must_increase() -> None:
    hs_a = noise.Handshake.for_peer(A, B.public, PSK)
    hs_b = noise.Handshake.for_peer(B, A.public, PSK)
    lookup = lambda pk: hs_b  # noqa: E731
    first = noise.create_initiation(A, hs_a, 1, 1_700_000_000.0, EPH_A)
    older = noise.create_initiation(A, hs_a, 2, 1_699_999_999.0, EPH_A)
    newer = noise.create_initiation(A, hs_a, 3, 1_700_000_001.0, EPH_A)
    assert isinstance(noise.consume_initiation(B, first, lookup, 0.0), noise.ConsumedInitiation)
    assert noise.consume_initiation(B, first, lookup, 1.0) is DropReason.STALE_TIMESTAMP
    assert noise.consume_initiation(B, older, lookup, 1.0) is DropReason.STALE_TIMESTAMP
    assert noise.consume_initiation(B, newer, lookup, 0.015) is DropReason.INITIATION_FLOOD
    assert isinstance(noise.consume_initiation(B, newer, lookup, 0.021), noise.ConsumedInitiation)


def test_wrong_responder_key_cannot_decrypt() -> None:
    hs_a = noise.Handshake.for_peer(A, B.public, PSK)
    init = noise.create_initiation(A, hs_a, 1, 1.0, EPH_A)
    assert noise.consume_initiation(A, init, lambda pk: hs_a, 0.0) is DropReason.DECRYPT_FAILED


def test_response_state_rules() -> None:
    hs_b = noise.Handshake.for_peer(B, A.public, PSK)
    with pytest.raises(ValueError):
        noise.create_response(hs_b, 1, EPH_B)
    with pytest.raises(ValueError):
        noise.begin_session(hs_b)
    hs_a, _hs_b2, _, resp, _ = run_handshake()
    # A second copy of the response no longer matches: the handshake moved on.
    assert noise.consume_response(A, resp, lambda idx: hs_a) is DropReason.HANDSHAKE_FAILED
    assert noise.consume_response(A, resp, lambda idx: None) is DropReason.UNKNOWN_INDEX


def test_low_order_peer_key_refused() -> None:
    hs = noise.Handshake.for_peer(A, bytes(32))
    assert hs.precomputed_static_static is None
    with pytest.raises(ValueError):
        noise.create_initiation(A, hs, 1, 1.0, EPH_A)
