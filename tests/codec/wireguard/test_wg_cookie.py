"""mac1/mac2, cookie replies (XChaCha20-Poly1305), the 120 s secret, and the handshake rate limiter."""

from __future__ import annotations

from wg_helpers import PRIV_A, PRIV_B, det_rand

from udpflannel.codec.wireguard import crypto
from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.cookie import CookieChecker, CookieGenerator, RateLimiter, source_bytes

PUB_A = crypto.public_key(PRIV_A)
PUB_B = crypto.public_key(PRIV_B)
SRC = source_bytes(("198.18.0.1", 51820))


def message() -> bytes:
    return m.encode_initiation(m.Initiation(1, b"e" * 32, b"s" * 48, b"t" * 28, bytes(16), bytes(16)))


def test_mac1_by_definition() -> None:
    gen = CookieGenerator.for_public_key(PUB_B)
    out = gen.add_macs(message(), 0.0)
    key = crypto.hash_(b"mac1----" + PUB_B)
    assert out[116:132] == crypto.mac(key, out[:116])
    assert out[132:] == bytes(16)  # no cookie yet: mac2 is zero
    checker = CookieChecker.for_public_key(PUB_B, det_rand(b"c"))
    assert checker.check_mac1(out)
    assert not CookieChecker.for_public_key(PUB_A, det_rand(b"c")).check_mac1(out)
    tampered = bytearray(out)
    tampered[20] ^= 1
    assert not checker.check_mac1(bytes(tampered))


def test_cookie_reply_gives_mac2() -> None:
    checker = CookieChecker.for_public_key(PUB_B, det_rand(b"c"))
    gen = CookieGenerator.for_public_key(PUB_B)
    msg = gen.add_macs(message(), 0.0)
    assert not checker.check_mac2(msg, SRC, 0.0)
    reply_bytes = checker.create_reply(msg, 1, SRC, 0.0)
    assert len(reply_bytes) == m.MESSAGE_COOKIE_REPLY_SIZE
    reply = m.decode_cookie_reply(reply_bytes)
    # The reply's AAD is our last mac1, and its key is HASH("cookie--" || responder public).
    cookie = crypto.xaead_decrypt(
        crypto.hash_(b"cookie--" + PUB_B), reply.nonce, reply.enc_cookie, msg[116:132]
    )
    assert cookie == crypto.mac(checker.secret, SRC)
    assert gen.consume_reply(reply, 1.0)
    msg2 = gen.add_macs(message(), 2.0)
    assert msg2[132:] == crypto.mac(cookie, msg2[:132])
    assert checker.check_mac2(msg2, SRC, 2.0)
    assert not checker.check_mac2(msg2, source_bytes(("198.18.0.1", 51821)), 2.0)


def test_cookie_expires_after_120s_and_secret_rotates() -> None:
    checker = CookieChecker.for_public_key(PUB_B, det_rand(b"c"))
    gen = CookieGenerator.for_public_key(PUB_B)
    msg = gen.add_macs(message(), 0.0)
    gen.consume_reply(m.decode_cookie_reply(checker.create_reply(msg, 1, SRC, 0.0)), 0.0)
    assert gen.add_macs(message(), 120.0)[132:] != bytes(16)
    assert gen.add_macs(message(), 120.5)[132:] == bytes(16)
    first_secret = checker.secret
    msg = gen.add_macs(message(), 100.0)
    assert checker.check_mac2(msg, SRC, 100.0)
    assert not checker.check_mac2(msg, SRC, 121.0)  # the secret is older than 120 s
    checker.create_reply(msg, 1, SRC, 121.0)
    assert checker.secret != first_secret


def test_reply_for_other_message_rejected() -> None:
    checker = CookieChecker.for_public_key(PUB_B, det_rand(b"c"))
    gen = CookieGenerator.for_public_key(PUB_B)
    reply = m.decode_cookie_reply(checker.create_reply(gen.add_macs(message(), 0.0), 1, SRC, 0.0))
    assert not CookieGenerator.for_public_key(PUB_B).consume_reply(reply, 0.0)  # no mac1 sent yet
    gen.add_macs(message()[:-40] + b"x" * 40, 0.0)  # a different message: different mac1
    assert not gen.consume_reply(reply, 0.0)


def test_source_bytes_layout() -> None:
    assert source_bytes(("198.18.0.1", 0x1234)) == bytes([198, 18, 0, 1, 0x34, 0x12])
    assert source_bytes(("::ffff:198.18.0.1", 1)) == bytes([198, 18, 0, 1, 1, 0])
    assert len(source_bytes(("fd00:198::1", 1))) == 18


def test_rate_limiter_burst_then_rate() -> None:
    rl = RateLimiter()
    ip = b"\xc6\x12\x00\x01"
    assert [rl.allow(ip, 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rl.allow(b"\xc6\x12\x00\x02", 0.0)  # other IPs have their own bucket
    assert not rl.allow(ip, 0.04)
    assert rl.allow(ip, 0.06)  # one token per 50 ms
    assert [rl.allow(ip, 10.0) for _ in range(6)] == [True] * 5 + [False]
