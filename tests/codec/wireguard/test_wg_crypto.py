"""Known answers for the primitives: BLAKE2s (RFC 7693), HMAC/KDF against their definitions, HChaCha20 and
XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03), X25519 (RFC 7748) and TAI64N."""

from __future__ import annotations

import hashlib
import struct

from udpflannel.codec.wireguard import crypto

# draft-irtf-cfrg-xchacha-03 section 2.2.1.
HCHACHA_KEY = bytes(range(32))
HCHACHA_NONCE = bytes.fromhex("000000090000004a0000000031415927")
HCHACHA_OUT = bytes.fromhex("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
# draft-irtf-cfrg-xchacha-03 appendix A.3.1.
X_KEY = bytes(range(0x80, 0xA0))
X_NONCE = bytes(range(0x40, 0x58))
X_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
X_PLAIN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
    b"sunscreen would be it."
)
X_CIPHER = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
)
X_TAG = bytes.fromhex("c0875924c1c7987947deafd8780acf49")
# RFC 7748 section 6.1.
ALICE_PRIV = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PUB = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_hash_is_blake2s_rfc7693() -> None:
    # RFC 7693 appendix B: BLAKE2s-256("abc").
    assert crypto.hash_(b"abc") == bytes.fromhex(
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    )


def test_mac_is_keyed_blake2s_128() -> None:
    key = bytes(range(32))
    out = crypto.mac(key, b"message")
    assert len(out) == 16
    assert out == hashlib.blake2s(b"message", key=key, digest_size=16).digest()
    # A 16-byte keyed digest is not a truncated 32-byte one (digest size is in the parameter block).
    assert out != hashlib.blake2s(b"message", key=key).digest()[:16]


def _hmac_by_definition(key: bytes, data: bytes) -> bytes:
    block = 64  # BLAKE2s block size
    key = key.ljust(block, b"\x00")
    inner = hashlib.blake2s(bytes(b ^ 0x36 for b in key) + data).digest()
    return hashlib.blake2s(bytes(b ^ 0x5C for b in key) + inner).digest()


def test_hmac_matches_definition() -> None:
    for key, data in ((b"k" * 32, b""), (bytes(32), b"x" * 200), (b"short", b"data")):
        assert crypto.hmac_(key, data) == _hmac_by_definition(key, data)


def test_kdf_matches_whitepaper_definition() -> None:
    c, x = bytes(range(32)), b"input keying material"
    t0 = _hmac_by_definition(c, x)
    t1 = _hmac_by_definition(t0, b"\x01")
    t2 = _hmac_by_definition(t0, t1 + b"\x02")
    t3 = _hmac_by_definition(t0, t2 + b"\x03")
    assert crypto.kdf1(c, x) == t1
    assert crypto.kdf2(c, x) == (t1, t2)
    assert crypto.kdf3(c, x) == (t1, t2, t3)


def test_hchacha20_draft_vector() -> None:
    assert crypto.hchacha20(HCHACHA_KEY, HCHACHA_NONCE) == HCHACHA_OUT


def test_xchacha20_poly1305_draft_vector() -> None:
    assert crypto.xaead_encrypt(X_KEY, X_NONCE, X_PLAIN, X_AAD) == X_CIPHER + X_TAG
    assert crypto.xaead_decrypt(X_KEY, X_NONCE, X_CIPHER + X_TAG, X_AAD) == X_PLAIN
    assert crypto.xaead_decrypt(X_KEY, X_NONCE, X_CIPHER + X_TAG, X_AAD[:-1]) is None
    flipped = bytearray(X_CIPHER + X_TAG)
    flipped[3] ^= 1
    assert crypto.xaead_decrypt(X_KEY, X_NONCE, bytes(flipped), X_AAD) is None
    assert crypto.xaead_decrypt(X_KEY, X_NONCE, b"short", X_AAD) is None


def test_x25519_rfc7748() -> None:
    assert crypto.public_key(ALICE_PRIV) == ALICE_PUB
    assert crypto.dh(ALICE_PRIV, BOB_PUB) == SHARED


def test_dh_with_low_order_point_is_none() -> None:
    assert crypto.dh(ALICE_PRIV, bytes(32)) is None
    assert crypto.dh(ALICE_PRIV, b"\x01" + bytes(31)) is None


def test_generate_private_key_clamps() -> None:
    k = crypto.generate_private_key(b"\xff" * 32)
    assert k[0] & 7 == 0 and k[31] & 0x80 == 0 and k[31] & 0x40


def test_aead_round_trip_and_nonce_layout() -> None:
    key = bytes(range(32))
    ct = crypto.aead_encrypt(key, 7, b"hello", b"ad")
    assert crypto.aead_decrypt(key, 7, ct, b"ad") == b"hello"
    assert crypto.aead_decrypt(key, 8, ct, b"ad") is None
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    assert ChaCha20Poly1305(key).encrypt(bytes(4) + struct.pack("<Q", 7), b"hello", b"ad") == ct


def test_tai64n_layout_and_whitening() -> None:
    ts = crypto.tai64n(1_700_000_000.5)
    seconds, nanos = struct.unpack(">QI", ts)
    assert seconds == 0x400000000000000A + 1_700_000_000
    assert nanos % (1 << 24) == 0 and 0 < 500_000_000 - nanos < (1 << 24)
    assert crypto.tai64n(1.0) < crypto.tai64n(2.0)


def test_hmac_matches_the_hmac_module_for_every_key_length() -> None:
    import hashlib
    import hmac

    from udpflannel.codec.wireguard.crypto import hmac_

    for n in (0, 1, 32, 63, 64, 65, 200):
        for data in (b"", b"\x01", bytes(range(100))):
            key = bytes((7 * i + n) & 0xFF for i in range(n))
            assert hmac_(key, data) == hmac.new(key, data, hashlib.blake2s).digest()


def test_dh_takes_bytes_or_a_key_object() -> None:
    from udpflannel.codec.wireguard.crypto import dh, generate_private_key, private_key_object, public_key

    a, b = generate_private_key(bytes(range(32))), generate_private_key(bytes(range(1, 33)))
    shared = dh(a, public_key(b))
    assert shared is not None and shared == dh(private_key_object(a), public_key(b)) == dh(b, public_key(a))
