"""coalesce against the GRO rules of spec/fastpath.md: coalesce(split(p)) == p, the per-packet twin gives the
same bytes, non-joinable neighbours stay apart with zero headers, and nothing malformed raises."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packet_builders import Super, build_tcp, build_udp, payload_bytes, tcp_superpackets

from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.drops import DropReason
from udpflannel.packet.gro import coalesce
from udpflannel.packet.gso import split_superpacket
from udpflannel.packet.parse import validate_ip
from udpflannel.packet.vnet import ZERO_VNET_HDR, VnetHdr

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def joined(writes: list[tuple]) -> list[bytes]:
    return [b"".join(bytes(b) for b in w) for w in writes]


def segments(sp: Super) -> list[bytes]:
    return reference.split(sp.raw, sp.vh)


@given(sp=tcp_superpackets(gro_flags=True), headroom=st.sampled_from([0, 4, 10, 50, 64]))
@SETTINGS
def test_coalesce_of_split_is_the_superpacket(sp: Super, headroom: int) -> None:
    batch = split_superpacket(sp.raw, sp.vh, headroom)
    out = joined(coalesce(batch))
    if batch.n == 1:
        # a single segment is written as it is: finished checksum, zero virtio header
        assert out == [ZERO_VNET_HDR + reference.split(sp.raw, sp.vh)[0]]
    else:
        assert out == [sp.vh.encode() + sp.raw]


@given(sp=tcp_superpackets(gro_flags=True), corrupt=st.integers(-1, 50))
@SETTINGS
def test_given_codes_give_the_same_writes(sp: Super, corrupt: int) -> None:
    """The dataplane validates first and passes its codes; the result must not depend on that."""
    segs = segments(sp)
    if 0 <= corrupt < len(segs):
        bad = bytearray(segs[corrupt])
        bad[-1] ^= 0x5A
        segs[corrupt] = bytes(bad)
    a = PacketBatch.from_packets(segs, headroom=16)
    b = PacketBatch.from_packets(segs, headroom=16)
    codes = validate_ip(b, l4_checksum=True)
    assert joined(coalesce(a)) == joined(coalesce(b, codes))


@given(sp=tcp_superpackets(gro_flags=True))
@SETTINGS
def test_coalesce_matches_twin(sp: Super) -> None:
    segs = segments(sp)
    out = joined(coalesce(PacketBatch.from_packets(segs, headroom=16)))
    want = [reference.coalesce_run(segs)] if len(segs) > 1 else [ZERO_VNET_HDR + segs[0]]
    assert out == want


def test_two_flows_interleaved_runs() -> None:
    a = segments(build_tcp(v6=False, payload=payload_bytes(1, 4000), mss=1000, flags="PA"))
    b = segments(build_tcp(v6=True, payload=payload_bytes(2, 3000), mss=1000, flags="A"))
    pkts = a[:2] + b + a[2:]
    out = joined(coalesce(PacketBatch.from_packets(pkts, headroom=16)))
    assert out == [reference.coalesce_run(a[:2]), reference.coalesce_run(b), reference.coalesce_run(a[2:])]


def _run(flags: str = "A", n: int = 5, mss: int = 1000, **kw: object) -> list[bytes]:
    return segments(build_tcp(v6=False, payload=payload_bytes(3, n * mss), mss=mss, flags=flags, **kw))


@pytest.mark.parametrize(
    ("name", "pkts", "groups"),
    [
        ("in order", _run(), [5]),
        ("psh ends a run", _run("PA", 2) + _run("A", 2, seq=1000 + 2000), [2, 2]),
        ("gap in seq", _run()[:2] + _run()[3:], [2, 2]),
        ("short one in the middle", _run()[:2] + _run(n=1, mss=500, seq=3000) + _run(n=2, seq=3500), [3, 2]),
        ("different ack", _run()[:2] + _run(ack=5)[2:], [2, 3]),
        ("different ttl", _run()[:2] + _run(ttl=9)[2:], [2, 3]),
        ("fin is not merged", _run("FA", 3), [2, 1]),
        ("syn alone", segments(build_tcp(v6=False, payload=b"", mss=1000, flags="S")), [1]),
        ("different window is merged", _run()[:2] + _run(window=1)[2:], [5]),
    ],
)
def test_join_rules(name: str, pkts: list[bytes], groups: list[int]) -> None:
    want = []
    pos = 0
    for size in groups:
        run = pkts[pos : pos + size]
        want.append(ZERO_VNET_HDR + run[0] if size == 1 else reference.coalesce_run(run))
        pos += size
    assert joined(coalesce(PacketBatch.from_packets(pkts, headroom=16))) == want, name


def test_64k_limit_cuts_runs() -> None:
    segs = [s for k in range(4) for s in _run(n=25, mss=1448, seq=1000 + k * 25 * 1448)]
    out = joined(coalesce(PacketBatch.from_packets(segs, headroom=16)))
    most = (65535 - 40) // 1448
    assert [VnetHdr.decode(w).gso_size for w in out] == [1448, 1448, 1448]
    assert [len(w) - 10 for w in out] == [40 + most * 1448, 40 + most * 1448, 40 + (100 - 2 * most) * 1448]
    assert out[0] == reference.coalesce_run(segs[:most])


def test_udp_and_corrupt_rows() -> None:
    udp = reference.split(*(lambda s: (s.raw, s.vh))(build_udp(v6=False, payload=bytes(3000), mss=1000)))
    tcp = _run(n=3)
    bad = bytearray(tcp[1])
    bad[-1] ^= 0xFF  # payload corrupted: the TCP checksum no longer verifies
    pkts = [*udp, tcp[0], bytes(bad), tcp[2]]
    batch = PacketBatch.from_packets(pkts, headroom=16)
    codes = validate_ip(batch, l4_checksum=True)
    assert codes.tolist() == [0, 0, 0, 0, DropReason.BAD_L4_CHECKSUM, 0]
    out = joined(coalesce(batch, codes))
    assert out == [ZERO_VNET_HDR + p for p in [*udp, tcp[0], tcp[2]]]


def test_plain_mode_writes_bare_packets() -> None:
    segs = _run(n=3)
    out = joined(coalesce(PacketBatch.from_packets(segs, headroom=0), vnet=False))
    assert out == segs
    out = joined(coalesce(PacketBatch.from_packets(segs, headroom=10), gro=False))
    assert out == [ZERO_VNET_HDR + s for s in segs]


def test_vnet_header_fields() -> None:
    segs = _run(n=3, mss=1200)
    w = joined(coalesce(PacketBatch.from_packets(segs, headroom=32)))[0]
    vh = VnetHdr.decode(w)
    assert vh == VnetHdr(flags=1, gso_type=1, hdr_len=40, gso_size=1200, csum_start=20, csum_offset=16)
    assert struct.unpack("!H", w[10 + 2 : 10 + 4])[0] == 40 + 3600


@given(
    rows=st.lists(st.binary(max_size=120), min_size=1, max_size=12),
    headroom=st.sampled_from([0, 16]),
    uso=st.booleans(),
)
@settings(max_examples=300, deadline=None)
def test_random_rows_never_raise(rows: list[bytes], headroom: int, uso: bool) -> None:
    batch = PacketBatch.from_packets(rows, headroom=headroom)
    codes = validate_ip(batch, l4_checksum=True)
    out = coalesce(batch, codes, uso=uso)
    assert len(out) <= int(np.count_nonzero(codes == 0))


@given(cut=st.lists(st.integers(0, 1100), min_size=4, max_size=4))
@settings(max_examples=150, deadline=None)
def test_truncated_segments_never_raise(cut: list[int]) -> None:
    segs = _run(n=4)
    rows = [s[:c] for s, c in zip(segs, cut, strict=True)]
    batch = PacketBatch.from_packets(rows, headroom=16)
    out = joined(coalesce(batch))
    for w in out:
        assert len(w) >= 10
