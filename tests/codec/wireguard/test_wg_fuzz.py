"""Hostile input: every truncated prefix and every bit flip of valid messages of each type, and random
bytes, become Drop(reason) (or, for a harmless flip, a normal result) and never an exception."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wg_helpers import ENDPOINT_A, ENDPOINT_B, Pair, ipv4_packet, make_pair

from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.batch import open_batch
from udpflannel.codec.wireguard.events import Delivered, Drop, DropReason, Reply


def samples() -> tuple[Pair, dict[str, bytes]]:
    """A pair mid-session plus one valid message of each type, addressed to B (cookie reply to A)."""
    p = make_pair()
    init = p.a.initiate(p.b.identity.public, p.now)[0].data
    p.b.force_under_load = True
    cookie = p.b.receive_datagram(init, ENDPOINT_A, p.now)[0].data
    p.b.force_under_load = False
    p.a.peers[p.b.identity.public].handshake.last_sent_handshake = float("-inf")
    p.now += 1
    init = p.a.initiate(p.b.identity.public, p.now)[0].data
    resp = p.b.receive_datagram(init, ENDPOINT_A, p.now)[0].data
    p.deliver(p.b, [Reply(resp, None)])
    data = p.a.send(p.b.identity.public, ipv4_packet(40), p.now)
    keepalive = p.a.send(p.b.identity.public, b"", p.now)
    return p, {"initiation": init, "response": resp, "cookie": cookie, "data": data, "keepalive": keepalive}


def feed(p: Pair, name: str, data: bytes) -> list:
    # Responses and cookie replies are meant for A; the rest for B.
    if name in ("response", "cookie"):
        return p.a.receive_datagram(data, ENDPOINT_B, p.now)
    return p.b.receive_datagram(data, ENDPOINT_A, p.now)


def test_every_truncated_prefix_is_dropped() -> None:
    p, msgs = samples()
    for name, msg in msgs.items():
        for n in range(len(msg)):
            out = feed(p, name, msg[:n])
            assert len(out) == 1 and isinstance(out[0], Drop), (name, n, out)
            if n < 4:
                assert out[0].reason is DropReason.BAD_HEADER


def test_every_bit_flip_is_dropped() -> None:
    p, msgs = samples()
    p.now += 1.0  # past the 20 ms initiation flood limit
    for name, msg in msgs.items():
        for bit in range(len(msg) * 8):
            flipped = bytearray(msg)
            flipped[bit // 8] ^= 1 << (bit % 8)
            out = feed(p, name, bytes(flipped))
            drops = [e for e in out if isinstance(e, Drop)]
            if name == "initiation" and bit >= m.INIT_OFFSET_MAC2 * 8:
                continue  # mac2 is not checked unless under load
            if name == "response" and bit >= m.RESP_OFFSET_MAC2 * 8:
                continue
            assert drops and not any(isinstance(e, Delivered) for e in out), (name, bit, out)
    assert sum(p.a.drops.values()) + sum(p.b.drops.values()) > 1000


def test_extra_trailing_bytes_on_handshake_messages() -> None:
    p, msgs = samples()
    for name in ("initiation", "response", "cookie"):
        out = feed(p, name, msgs[name] + b"\x00")
        assert out == [Drop(DropReason.BAD_SIZE)]


@pytest.fixture(scope="module")
def fuzz_pair() -> Pair:
    # Building a pair costs a handshake; hypothesis examples share one (they only ever get dropped).
    return samples()[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), kind=st.sampled_from([0, 1, 2, 3, 4]))
def test_random_bytes_never_raise(fuzz_pair: Pair, data: bytes, kind: int) -> None:
    p = fuzz_pair
    if kind and len(data) >= 4:
        data = bytes([kind, 0, 0, 0]) + data[4:]
    for dev, src in ((p.a, ENDPOINT_B), (p.b, ENDPOINT_A)):
        out = dev.receive_datagram(data, src, p.now)
        assert all(isinstance(e, Drop | Reply) for e in out)
        batch = open_batch(dev, [memoryview(bytearray(data))], src, p.now)
        assert batch.delivered == []


@pytest.fixture(scope="module")
def fuzz_samples() -> tuple[Pair, dict[str, bytes]]:
    return samples()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["initiation", "response", "cookie", "data", "keepalive"]),
    edits=st.lists(st.tuples(st.integers(0, 147), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 200),
    extra=st.binary(max_size=8),
)
def test_mutated_valid_messages_never_raise(fuzz_samples, name: str, edits, cut: int, extra: bytes) -> None:
    """Random byte edits, truncation and trailing bytes on a valid message of each type."""
    p, msgs = fuzz_samples
    msg = bytearray(msgs[name])
    changed = False
    for pos, value in edits:
        if pos < len(msg) and msg[pos] != value:
            msg[pos] = value
            changed = True
    data = bytes(msg[: min(cut, len(msg))] if cut < len(msg) else msg) + extra
    out = feed(p, name, data)
    assert all(isinstance(e, Drop | Reply | Delivered) for e in out)
    if changed or len(data) != len(msgs[name]):
        # A changed message is never delivered (mac2 bytes aside, which nothing checks unless under load).
        assert not any(isinstance(e, Delivered) for e in out)
