"""validate_ip: each malformed shape gets its named reason, valid packets pass, random bytes
never raise, and link padding is trimmed."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from packet_builders import build_tcp, build_udp
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.drops import DropReason
from udpflannel.packet.parse import ip_fields, validate_ip, validate_one
from udpflannel.packet.vnet import VnetHdr

R = DropReason


def _ok_tcp4() -> bytes:
    sp = build_tcp(v6=False, payload=b"hello world", mss=1448)
    return reference.split(sp.raw, VnetHdr(1, 0, 0, 0, 20, 16))[0]


def _set(raw: bytes, at: int, fmt: str, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _fix_ip_csum(raw: bytes) -> bytes:
    b = bytearray(raw)
    b[10:12] = b"\0\0"
    struct.pack_into("!H", b, 10, reference.checksum(b[: (b[0] & 15) * 4]))
    return bytes(b)


def test_reasons() -> None:
    good = _ok_tcp4()
    v6 = bytes(IPv6(src="fd00:198::1", dst="fd00:198::2") / UDP(sport=1, dport=2) / Raw(b"abc"))
    cases = [
        (good, R.NONE),
        (v6, R.NONE),
        (bytes(IP(src="198.19.0.1", dst="198.19.0.2") / ICMP()), R.NONE),
        (b"", R.TRUNCATED),
        (good[:10], R.TRUNCATED),
        (b"\x75" + good[1:], R.BAD_HEADER),  # version 7
        (_fix_ip_csum(b"\x44" + good[1:]), R.BAD_HEADER),  # IHL 4
        (_fix_ip_csum(b"\x4f" + good[1:]), R.TRUNCATED),  # IHL 15 > 51 bytes? no: 60 > len
        (_fix_ip_csum(_set(good, 2, "!H", 10)), R.BAD_HEADER),  # total length < header
        (_fix_ip_csum(_set(good, 2, "!H", len(good) + 1)), R.TRUNCATED),
        (_set(good, 8, "!B", 1), R.BAD_IP_CHECKSUM),  # TTL changed, checksum not
        (v6[:39], R.TRUNCATED),
        (_set(v6, 4, "!H", 100), R.TRUNCATED),
        (good[:-1], R.TRUNCATED),
    ]
    batch = PacketBatch.from_packets([c for c, _ in cases], headroom=8)
    codes = validate_ip(batch)
    assert [R(c) for c in codes.tolist()] == [r for _, r in cases]
    assert [R(validate_one(c)[0]) for c, _ in cases] == [r for _, r in cases]


def test_l4_checksums() -> None:
    good = _ok_tcp4()
    sp = build_udp(v6=True, payload=b"x" * 33, mss=1000)
    udp6 = reference.split(sp.raw, VnetHdr(1, 0, 0, 0, 40, 6))[0]
    ip = IP(src="198.19.0.1", dst="198.19.0.2")
    udp4_nocsum = bytes(ip / UDP(sport=1, dport=2, chksum=0) / Raw(b"abc"))
    udp6_zero = _set(udp6, 46, "!H", 0)  # forbidden in IPv6
    bad_tcp = _set(good, len(good) - 2, "!H", 0x4142)
    frag = _fix_ip_csum(_set(bad_tcp, 6, "!H", 0x2000))  # MF set: cannot be verified, so not judged
    pkts = [good, udp6, udp4_nocsum, udp6_zero, bad_tcp, frag]
    codes = validate_ip(PacketBatch.from_packets(pkts, headroom=0), l4_checksum=True)
    bad = R.BAD_L4_CHECKSUM
    assert [R(c) for c in codes.tolist()] == [R.NONE, R.NONE, R.NONE, bad, bad, R.NONE]
    assert [R(validate_one(p)[0]) for p in pkts] == [R.NONE, R.NONE, R.NONE, bad, bad, R.NONE]


def test_padding_is_trimmed() -> None:
    good = _ok_tcp4()
    batch = PacketBatch.from_packets([good + b"\0" * 6], headroom=4)
    assert validate_ip(batch, l4_checksum=True).tolist() == [0]
    assert batch.lengths.tolist() == [len(good)]
    f = ip_fields(batch)
    assert (f.version.tolist(), f.l3len.tolist(), f.proto.tolist()) == ([4], [20], [6])


@given(rows=st.lists(st.binary(max_size=80), min_size=1, max_size=16), headroom=st.integers(0, 20))
@settings(max_examples=300, deadline=None)
def test_random_bytes_give_codes_not_exceptions(rows: list[bytes], headroom: int) -> None:
    batch = PacketBatch.from_packets(rows, headroom=headroom)
    codes = validate_ip(batch, l4_checksum=True)
    assert codes.shape == (len(rows),)
    assert set(codes.tolist()) <= {int(r) for r in R}


@given(cut=st.integers(0, 80))
@settings(max_examples=80, deadline=None)
def test_every_truncated_prefix_is_a_drop(cut: int) -> None:
    good = _ok_tcp4()
    codes = validate_ip(PacketBatch.from_packets([good[:cut]]))
    assert codes.tolist() == ([0] if cut >= len(good) else [R.TRUNCATED])


def test_labels() -> None:
    assert R.BAD_L4_CHECKSUM.label == "bad_l4_checksum"


def _samples() -> list[bytes]:
    tcp4 = _ok_tcp4()
    sp = build_udp(v6=True, payload=b"y" * 21, mss=1000)
    udp6 = reference.split(sp.raw, VnetHdr(1, 0, 0, 0, 40, 6))[0]
    sp = build_tcp(v6=True, payload=b"z" * 30, mss=1000)
    tcp6 = reference.split(sp.raw, VnetHdr(1, 0, 0, 0, 40, 16))[0]
    ip = IP(src="198.19.0.1", dst="198.19.0.2")
    udp4 = bytes(ip / UDP(sport=1, dport=2) / Raw(b"abcde"))
    udp4_zero = bytes(ip / UDP(sport=1, dport=2, chksum=0) / Raw(b"abcde"))
    icmp = bytes(ip / ICMP() / Raw(b"ping"))
    return [tcp4, udp6, tcp6, udp4, udp4_zero, icmp]


@given(
    picks=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 200), st.integers(0, 255), st.integers(-3, 6)),
        min_size=1,
        max_size=12,
    ),
    headroom=st.sampled_from([0, 16]),
    one_flow=st.booleans(),
)
@settings(max_examples=400, deadline=None)
def test_matches_per_packet_twin(
    picks: list[tuple[int, int, int, int]], headroom: int, one_flow: bool
) -> None:
    """Mutated packets (one byte changed, cut short or padded) get the same code and trimmed length from
    validate_ip as from reference.validate, row by row; one_flow keeps to IPv4 TCP (the fast path)."""
    base = _samples()
    rows = []
    for which, pos, value, resize in picks:
        p = bytearray(base[0 if one_flow else which])
        if pos < len(p):
            p[pos] = value
        p = p[: len(p) + resize] if resize < 0 else p + bytes(resize)
        rows.append(bytes(p))
    batch = PacketBatch.from_packets(rows, headroom=headroom)
    codes = validate_ip(batch, l4_checksum=True)
    want = [reference.validate(r) for r in rows]
    assert [(int(c), int(ln)) for c, ln in zip(codes, batch.lengths, strict=True)] == want
    # the per-packet path the engine takes for a few small packets says the same, from bytes or views
    assert [validate_one(r) for r in rows] == want
    assert [validate_one(memoryview(r)) for r in rows] == want
