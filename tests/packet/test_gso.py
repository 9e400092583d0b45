"""split_superpacket against scapy (every segment parses with correct checksums, lengths, seq, IP ids) and
against its per-packet twin in udpflannel.packet.reference (identical bytes)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packet_builders import Super, build_tcp, build_udp, payload_bytes, tcp_superpackets, udp_superpackets
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from udpflannel.packet import reference
from udpflannel.packet.drops import DropReason
from udpflannel.packet.gso import MAX_SEGMENTS, packed_payload, split_superpacket
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP,
    VnetHdr,
)

UFO = VIRTIO_NET_HDR_GSO_UDP
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rebuilt(layer_cls: type, seg: bytes):
    """Parse seg, drop every checksum and length so scapy recomputes them, and parse the result again."""
    p = layer_cls(seg)
    for layer in (IP, TCP, UDP):
        if layer in p:
            if hasattr(p[layer], "chksum"):
                del p[layer].chksum
            if layer is IP:
                del p[IP].len
            if layer is UDP:
                del p[UDP].len
    if IPv6 in p:
        del p[IPv6].plen
    return layer_cls(bytes(p))


def check_segments(sp: Super, segs: list[bytes], headroom: int) -> None:
    mss = sp.vh.gso_size
    layer_cls = IPv6 if sp.v6 else IP
    l4 = TCP if sp.tcp else UDP
    expected = -(-len(sp.payload) // mss) if sp.payload else 1
    assert len(segs) == expected
    hlen = sp.vh.hdr_len
    assert b"".join(s[hlen:] for s in segs) == sp.payload
    # scapy is slow: dissect the first and last three segments (the twin comparison covers every byte).
    for i, seg in enumerate(segs):
        if 3 <= i < len(segs) - 3:
            continue
        p = layer_cls(seg)
        again = rebuilt(layer_cls, seg)
        assert bytes(again) == seg, "a checksum or length differs from scapy's"
        if sp.v6:
            assert p[IPv6].plen == len(seg) - 40
        else:
            assert p[IP].len == len(seg)
            assert p[IP].id == (sp.ip_id + i) & 0xFFFF
        assert len(bytes(p[l4].payload)) <= mss
        if sp.tcp:
            assert p[TCP].seq == (sp.seq + i * mss) & 0xFFFFFFFF
            last = i == len(segs) - 1
            want = sp.flags
            if not last:
                want &= ~0x09  # FIN, PSH only on the last segment
            if i:
                want &= ~0x80  # CWR only on the first
            assert int(p[TCP].flags) == want
        else:
            assert p[UDP].len == len(seg) - (40 if sp.v6 else 20)


@given(sp=tcp_superpackets(), headroom=st.sampled_from([0, 10, 50, 51, 64]))
@SETTINGS
def test_tcp_split_matches_scapy_and_twin(sp: Super, headroom: int) -> None:
    batch = split_superpacket(sp.raw, sp.vh, headroom)
    assert batch.drop == 0 and batch.offset == headroom
    segs = batch.packets()
    check_segments(sp, segs, headroom)
    assert segs == reference.split(sp.raw, sp.vh)


@given(sp=udp_superpackets())
@SETTINGS
def test_udp_split_matches_scapy_and_twin(sp: Super) -> None:
    segs = split_superpacket(sp.raw, sp.vh, 50).packets()
    check_segments(sp, segs, 50)
    assert segs == reference.split(sp.raw, sp.vh)


@given(
    sp=st.one_of(tcp_superpackets(), udp_superpackets()),
    head=st.sampled_from([0, 22]),
    mss_cut=st.integers(0, 3),
)
@SETTINGS
def test_packed_split_is_one_buffer_of_the_same_segments(sp: Super, head: int, mss_cut: int) -> None:
    """Rows end to end (for one UDP_SEGMENT send): the same segments as the padded layout, every segment
    size mod 4 (the tail bytes are summed apart), and the buffer is header + segment, row after row."""
    vh = sp.vh
    if vh.gso_size > 64:  # (tiny sizes would pass MAX_SEGMENTS)
        vh = VnetHdr(vh.flags, vh.gso_type, vh.hdr_len, vh.gso_size - mss_cut, vh.csum_start, vh.csum_offset)
    batch = split_superpacket(sp.raw, vh, head, packed=True)
    assert batch.drop == 0 and batch.offset == head
    segs = batch.packets()
    assert segs == reference.split(sp.raw, vh) == split_superpacket(sp.raw, vh, 64).packets()
    size = batch.stride - head  # the segment size to send with: every datagram but the last fills it
    assert all(len(x) == size for x in segs[:-1]) and 0 < len(segs[-1]) <= size
    batch.buf[:, :head] = 0xAB  # what an encapsulation header would be
    assert bytes(packed_payload(batch)) == b"".join(b"\xab" * head + x for x in segs)


@given(v6=st.booleans(), tcp=st.booleans(), n=st.integers(0, 1400), seed=st.integers(0, 1000))
@SETTINGS
def test_needs_csum_only_is_finished(v6: bool, tcp: bool, n: int, seed: int) -> None:
    """A packet without GSO but with a partial checksum comes back alone, with its checksum completed."""
    sp = build_tcp(v6=v6, payload=payload_bytes(seed, n), mss=1448) if tcp else None
    if sp is None:
        sp = build_udp(v6=v6, payload=payload_bytes(seed, n), mss=1448)
    vh = VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, sp.vh.csum_start, sp.vh.csum_offset)
    batch = split_superpacket(sp.raw, vh, 16)
    assert batch.n == 1
    seg = batch.packets()[0]
    cls = IPv6 if v6 else IP
    assert bytes(rebuilt(cls, seg)) == seg
    assert [seg] == reference.split(sp.raw, vh)


def test_plain_packet_passes_unchanged() -> None:
    sp = build_tcp(v6=False, payload=b"abc", mss=1448)
    for vh in (None, VnetHdr(), bytes(10)):
        batch = split_superpacket(sp.raw, vh, 20)
        assert batch.packets() == [sp.raw]


def test_segment_sizes_and_seq_wrap() -> None:
    payload = bytes(range(256)) * 40
    sp = build_tcp(v6=False, payload=payload, mss=1448, seq=2**32 - 100, ip_id=0xFFFF, flags="FPA")
    batch = split_superpacket(sp.raw, sp.vh, 50)
    assert batch.lengths.tolist() == [1488] * 7 + [10240 - 7 * 1448 + 40]
    seqs = [TCP(p[20:]).seq for p in batch.packets()]
    assert seqs == [(2**32 - 100 + i * 1448) % 2**32 for i in range(8)]
    assert [IP(p).id for p in batch.packets()][:2] == [0xFFFF, 0]
    assert [str(TCP(p[20:]).flags) for p in batch.packets()] == ["A"] * 7 + ["FPA"]


def test_headroom_is_left_for_encapsulation() -> None:
    sp = build_tcp(v6=True, payload=bytes(5000), mss=1400)
    batch = split_superpacket(sp.raw, sp.vh, 50)
    assert batch.buf.shape[0] == batch.n == 4
    assert all(bytes(batch.buf[i, 50:90]) == batch.packets()[i][:40] for i in range(4))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda raw, vh: (raw, VnetHdr(1, UFO, 28, 99, 20, 6)), DropReason.UNSUPPORTED_GSO),
        (lambda raw, vh: (raw, VnetHdr(1, 1, 52, 0, 20, 16)), DropReason.BAD_HEADER),  # gso_size 0
        (lambda raw, vh: (raw, VnetHdr(1, 1, 52, 1448, 24, 16)), DropReason.BAD_HEADER),  # csum_start != ihl
        (lambda raw, vh: (raw, VnetHdr(1, 4, 52, 1448, 20, 16)), DropReason.BAD_HEADER),  # TCPV6 on IPv4
        (lambda raw, vh: (raw, VnetHdr(1, 1, 52, 1448, 20, 6)), DropReason.BAD_HEADER),  # UDP csum_offset
        (lambda raw, vh: (raw[:30], vh), DropReason.TRUNCATED),
        (lambda raw, vh: (raw, VnetHdr(1, 1, 52, 1, 20, 16)), DropReason.TOO_BIG),
        (lambda raw, vh: (raw, VnetHdr(1, 0, 0, 0, 20, 16 + 5000)), DropReason.BAD_HEADER),
        (lambda raw, vh: (b"", vh), DropReason.BAD_HEADER),
        (lambda raw, vh: (raw, b"\x01\x01"), DropReason.BAD_HEADER),
    ],
)
def test_bad_superpackets_become_drop_codes(mutate, reason: DropReason) -> None:
    sp = build_tcp(v6=False, payload=bytes(3000), mss=1448)
    raw, vh = mutate(sp.raw, sp.vh)
    batch = split_superpacket(raw, vh, 50)
    assert batch.n == 0
    assert batch.drop == reason
    assert MAX_SEGMENTS < 3000


@pytest.mark.parametrize("csum_start", [41, 45, 47, 60])
def test_ipv6_l4_start_off_the_8_byte_extension_grid_is_refused(csum_start: int) -> None:
    # Extension headers are multiples of 8 bytes; an odd start once raised in the split's header sums.
    sp = build_tcp(v6=True, payload=bytes(3000), mss=1000)
    raw = bytearray(sp.raw)
    raw[csum_start + 12] = 0x50  # a TCP data offset of 5 words where the header would start
    vh = VnetHdr(1, sp.vh.gso_type, sp.vh.hdr_len, 1000, csum_start, sp.vh.csum_offset)
    batch = split_superpacket(bytes(raw), vh, 50)
    assert batch.n == 0
    assert batch.drop == DropReason.BAD_HEADER


@given(data=st.binary(max_size=200), hdr=st.binary(min_size=10, max_size=10), big=st.booleans())
@settings(max_examples=400, deadline=None)
def test_random_bytes_never_raise(data: bytes, hdr: bytes, big: bool) -> None:
    if big:
        data = data + bytes(3000)
    batch = split_superpacket(data, hdr, 50)
    assert (batch.n == 0) == (batch.drop != 0)
    assert batch.lengths.shape == (batch.n,)


@given(cut=st.integers(0, 2000), kind=st.sampled_from([1, 4, 5]), v6=st.booleans())
@settings(max_examples=200, deadline=None)
def test_truncated_superpackets_never_raise(cut: int, kind: int, v6: bool) -> None:
    build = build_udp if kind == 5 else build_tcp
    sp = build(v6=v6, payload=bytes(2000), mss=500)
    vh = VnetHdr(1, kind, sp.vh.hdr_len, 500, sp.vh.csum_start, sp.vh.csum_offset)
    batch = split_superpacket(sp.raw[:cut], vh, 50)
    if batch.n:
        assert all(len(p) <= sp.vh.csum_start + 60 + 500 for p in batch.packets())


def test_accepts_numpy_and_memoryview_input() -> None:
    sp = build_tcp(v6=False, payload=bytes(4000), mss=1000)
    a = split_superpacket(np.frombuffer(sp.raw, np.uint8), sp.vh, 50).packets()
    b = split_superpacket(memoryview(sp.raw), sp.vh.encode(), 50).packets()
    assert a == b == reference.split(sp.raw, sp.vh)
    assert struct.unpack("!H", a[0][2:4])[0] == 1040
    assert sp.vh.gso_type == VIRTIO_NET_HDR_GSO_TCPV4
