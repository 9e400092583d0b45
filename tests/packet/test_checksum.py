"""Vectorised checksums against the per-packet twin (udpflannel.packet.reference) and against scapy."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from packet_builders import build_tcp, build_udp
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from udpflannel.packet import reference
from udpflannel.packet.checksum import (
    finish,
    fold,
    inet_checksum_rows,
    inet_sum,
    inet_sum_rows,
    pseudo_sum_v4,
    pseudo_sum_v6,
)


@given(
    rows=hnp.arrays(np.uint8, st.tuples(st.integers(1, 20), st.integers(1, 300))),
    data=st.data(),
)
@settings(max_examples=300, deadline=None)
def test_rows_match_twin_with_garbage_after_each_row(rows: np.ndarray, data: st.DataObject) -> None:
    n, width = rows.shape
    lengths = np.array(data.draw(st.lists(st.integers(0, width), min_size=n, max_size=n)))
    got = inet_checksum_rows(rows, lengths)
    want = [reference.checksum(rows[i, : lengths[i]].tobytes()) for i in range(n)]
    assert got.tolist() == want


@given(n=st.integers(2, 40), width=st.integers(4, 200), short=st.integers(0, 199), seed=st.integers(0, 99))
@settings(max_examples=100, deadline=None)
def test_rows_uniform_and_one_short(n: int, width: int, short: int, seed: int) -> None:
    """The shape split and GRO trains produce: equal rows and a shorter last one."""
    rows = np.random.default_rng(seed).integers(0, 256, (n, width), np.uint8)
    lengths = np.full(n, width)
    lengths[-1] = min(short, width)
    initial = np.arange(n, dtype=np.uint64) * 977
    got = inet_checksum_rows(rows, lengths, initial)
    want = [reference.checksum(rows[i, : lengths[i]].tobytes(), int(initial[i])) for i in range(n)]
    assert got.tolist() == want


def test_many_short_rows_use_the_masked_path() -> None:
    rows = np.random.default_rng(5).integers(0, 256, (30, 64), np.uint8)
    lengths = np.arange(30) + 3
    want = [reference.checksum(rows[i, : lengths[i]].tobytes()) for i in range(30)]
    assert inet_checksum_rows(rows, lengths).tolist() == want


def test_rfc1071_example_and_folding() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
    assert inet_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert fold(np.array([0xFFFF + 1], np.uint64)).tolist() == [1]
    assert fold(np.array([0xFFFF], np.uint64)).tolist() == [0xFFFF]
    assert finish(np.array([0xFFFF], np.uint64)).tolist() == [0]
    assert inet_sum_rows(np.zeros((0, 8), np.uint8), np.zeros(0)).shape == (0,)


def _addr(raw: bytes, a: int, b: int) -> np.ndarray:
    return np.frombuffer(raw[a:b], np.uint8)[None, :]


CASES = [(build_tcp, False, TCP), (build_tcp, True, TCP), (build_udp, False, UDP), (build_udp, True, UDP)]


def test_pseudo_headers_give_scapy_checksums() -> None:
    for build, v6, l4 in CASES:
        sp = build(v6=v6, payload=bytes(range(200)) * 3 + b"x", mss=2000)
        seg = sp.raw  # the checksum field holds the partial sum; ours recomputes from a zeroed field
        pkt = (IPv6 if v6 else IP)(seg)
        l3 = 40 if v6 else 20
        body = bytearray(seg[l3:])
        col, proto = (16, 6) if l4 is TCP else (6, 17)
        body[col : col + 2] = b"\0\0"
        length = np.array([len(body)])
        if v6:
            ps = pseudo_sum_v6(_addr(seg, 8, 24), _addr(seg, 24, 40), proto, length)
        else:
            ps = pseudo_sum_v4(_addr(seg, 12, 16), _addr(seg, 16, 20), proto, length)
        ours = int(finish(np.array([inet_sum(bytes(body))], np.uint64) + ps)[0])
        del pkt[l4].chksum
        scapy_sum = (IPv6 if v6 else IP)(bytes(pkt))[l4].chksum
        assert ours == scapy_sum or (l4 is UDP and ours == 0 and scapy_sum == 0xFFFF)
