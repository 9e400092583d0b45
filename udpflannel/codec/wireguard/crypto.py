"""WireGuard's primitives: HASH/MAC/HMAC/KDF (BLAKE2s), X25519, (X)ChaCha20-Poly1305 and TAI64N.

Pure functions of their inputs: no sockets, no clock (TAI64N takes the Unix time as an argument).
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20

KEY_SIZE = 32
TAG_SIZE = 16
TAI64N_SIZE = 12
XNONCE_SIZE = 24
ZERO_KEY = bytes(KEY_SIZE)

# TAI64N label: 2^62 + 10 (the TAI-UTC offset wireguard-go uses, device/tai64n.go).
TAI64_BASE = 0x400000000000000A
# wireguard-go whitens the nanoseconds to 2^24 ns steps so a timestamp leaks less about the host clock.
TAI64N_WHITENER_MASK = 0x1000000 - 1

_BLAKE2S_BLOCK = 64
_IPAD = bytes(x ^ 0x36 for x in range(256))  # byte translation tables: key XOR ipad / opad
_OPAD = bytes(x ^ 0x5C for x in range(256))
# "expand 32-byte k", the ChaCha20 constant words (RFC 8439 section 2.3).
_CHACHA_CONSTANTS = struct.unpack("<4I", b"expand 32-byte k")


def hash_(data: bytes) -> bytes:
    """HASH: BLAKE2s-256."""
    return hashlib.blake2s(data).digest()


def mac(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """MAC: keyed BLAKE2s with a 16-byte digest (not HMAC)."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 written out: the hmac module's generic setup costs more than the two
    BLAKE2s calls, and a handshake makes ~20 HMACs on each side)."""
    if len(key) > _BLAKE2S_BLOCK:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(_BLAKE2S_BLOCK, b"\0")
    inner = hashlib.blake2s(key.translate(_IPAD))
    inner.update(data)
    outer = hashlib.blake2s(key.translate(_OPAD))
    outer.update(inner.digest())
    return outer.digest()


def kdf(chaining_key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """KDFn (whitepaper 5.4): HKDF with HMAC-BLAKE2s, n outputs of 32 bytes."""
    t0 = hmac_(chaining_key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac_(t0, prev + bytes([i]))
        out.append(prev)
    return tuple(out)


def kdf1(c: bytes, data: bytes) -> bytes:
    return kdf(c, data, 1)[0]


def kdf2(c: bytes, data: bytes) -> tuple[bytes, bytes]:
    a, b = kdf(c, data, 2)
    return a, b


def kdf3(c: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    a, b, d = kdf(c, data, 3)
    return a, b, d


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def generate_private_key(random32: bytes) -> bytes:
    """A clamped Curve25519 private key from 32 random bytes (same clamping as wg genkey)."""
    if len(random32) != KEY_SIZE:
        raise ValueError("a private key needs 32 random bytes")
    k = bytearray(random32)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


def private_key_object(private: bytes) -> X25519PrivateKey:
    """The key object of a 32-byte private key. Building one costs a scalar multiplication (it derives
    the public key), as much as a DH: keep it where a key serves more than once."""
    return X25519PrivateKey.from_private_bytes(private)


def public_key_of(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def dh(private: bytes | X25519PrivateKey, public: bytes) -> bytes | None:
    """X25519; None when the peer's point gives the all-zero secret (low-order point, whitepaper 5.4)."""
    key = private if isinstance(private, X25519PrivateKey) else X25519PrivateKey.from_private_bytes(private)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return None
    if shared == ZERO_KEY:
        return None
    return shared


def _nonce(counter: int) -> bytes:
    # Data and handshake AEAD nonce: 4 zero bytes then the 64-bit counter, little-endian.
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes | None:
    """None when the tag does not verify (or the input is shorter than a tag)."""
    if len(ciphertext) < TAG_SIZE:
        return None
    try:
        return ChaCha20Poly1305(key).decrypt(_nonce(counter), ciphertext, aad)
    except InvalidTag:
        return None


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha section 2.2), derived from one ChaCha20 keystream block.

    A ChaCha20 block is rounds(state) + state; HChaCha20 is words 0-3 and 12-15 of rounds(state). Those
    words of the initial state are the constants and the 16-byte input, so subtracting them recovers it.
    """
    if len(key) != KEY_SIZE or len(nonce16) != 16:
        raise ValueError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    # cryptography's ChaCha20 nonce is the whole 16-byte state tail (counter word + 96-bit nonce).
    block = Cipher(ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    words = struct.unpack("<16I", block)
    tail = struct.unpack("<4I", nonce16)
    out = [(words[i] - _CHACHA_CONSTANTS[i]) & 0xFFFFFFFF for i in range(4)]
    out += [(words[12 + i] - tail[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *out)


def _xchacha_parts(key: bytes, nonce24: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce24) != XNONCE_SIZE:
        raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce")
    subkey = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(subkey), b"\x00\x00\x00\x00" + nonce24[16:]


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XChaCha20-Poly1305: HChaCha20 subkey from the first 16 nonce bytes, ChaCha20-Poly1305 with the rest."""
    aead, nonce = _xchacha_parts(key, nonce24)
    return aead.encrypt(nonce, plaintext, aad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    if len(ciphertext) < TAG_SIZE:
        return None
    aead, nonce = _xchacha_parts(key, nonce24)
    try:
        return aead.decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        return None


def tai64n(unix_time: float) -> bytes:
    """TAI64N of a Unix time: big-endian u64 seconds label, big-endian u32 whitened nanoseconds."""
    seconds = int(unix_time // 1)
    nanos = round((unix_time - seconds) * 1e9)
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    nanos &= ~TAI64N_WHITENER_MASK
    return struct.pack(">QI", TAI64_BASE + seconds, nanos)
