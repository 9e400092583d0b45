"""coalesce_run, the one-superpacket fast path of GRO: every clean train (IPv4/IPv6, TCP options, odd sizes,
sequence numbers that wrap, behind a VXLAN-sized prefix or none, padded or end-to-end rows) becomes exactly
the superpacket it was split from; any flaw that must keep a train from being one superpacket (a corrupt
byte anywhere, PSH or a gap mid-train, a short middle row, a row with another prefix) gives None, so the
row-by-row path judges it."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packet_builders import TCP_OPTIONS, build_tcp, fix_checksums, gro_superpackets, payload_bytes

from udpflannel.packet import headers as h
from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gro import coalesce
from udpflannel.packet.gro_run import coalesce_run, join_runs

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PREFIX = bytes(range(100, 122))  # 22 bytes, as a VXLAN + inner Ethernet header


def laid_out(segs: list[bytes], prefix: bytes, end_to_end: bool) -> PacketBatch:
    """The segments behind `prefix`, as padded rows (a TUN read arena) or end to end (a UDP_GRO train;
    a row longer than the first, which no train has, is cut there and stale bytes fill short ones)."""
    rows = [prefix + s for s in segs]
    if not end_to_end:
        return PacketBatch.from_packets(rows, headroom=16)
    s = len(rows[0])
    raw = b"".join(r[:s].ljust(s, b"\xee") for r in rows)
    lengths = np.array([min(len(r), s) for r in rows], np.int32)
    return PacketBatch(np.frombuffer(raw, np.uint8).reshape(len(rows), s), lengths, 0, len(rows))


@st.composite
def trains(draw: st.DrawFn) -> tuple[list[bytes], bytes, bool]:
    v6 = draw(st.booleans())
    options = draw(st.sampled_from(TCP_OPTIONS))
    sp = draw(gro_superpackets(v6=v6, mss=draw(st.integers(100, 1448)), options=options))
    segs = reference.split(sp.raw, sp.vh)
    return segs, sp.vh.encode() + sp.raw, v6


@given(t=trains(), prefixed=st.booleans(), end_to_end=st.booleans())
@SETTINGS
def test_a_clean_train_is_its_superpacket(
    t: tuple[list[bytes], bytes, bool], prefixed: bool, end_to_end: bool
):
    segs, superpacket, _ = t
    prefix = PREFIX if prefixed else b""
    run = coalesce_run(laid_out(segs, prefix, end_to_end), len(prefix))
    assert run is not None and bytes(run) == superpacket == reference.coalesce_run(segs)


@given(
    t=trains(),
    flaw=st.sampled_from(["byte", "psh", "gap", "short", "prefix"]),
    where=st.integers(0, 10**6),
    end_to_end=st.booleans(),
)
@SETTINGS
def test_a_flawed_train_is_left_to_the_row_by_row_path(
    t: tuple[list[bytes], bytes, bool], flaw: str, where: int, end_to_end: bool
) -> None:
    segs, _, v6 = t
    l3 = h.IPV6_HLEN if v6 else h.IPV4_MIN_HLEN
    rows = [bytearray(PREFIX + s) for s in segs]
    middle = where % max(1, len(segs) - 1)  # any row but the last (PSH and a short row are fine there)
    seg = bytearray(segs[middle])
    in_prefix = flaw == "prefix"
    if flaw == "byte":
        i = where % len(rows)
        j = where % len(rows[i])
        rows[i][j] ^= 1 + where % 255
        in_prefix = j < len(PREFIX)
    elif flaw == "psh":
        seg[l3 + h.TCP_FLAGS] |= h.TCP_PSH
        fix_checksums(seg, v6)
        rows[middle] = bytearray(PREFIX + seg)
    elif flaw == "gap":
        i = 1 + where % (len(segs) - 1)  # a gap before row i
        seg = bytearray(segs[i])
        seq = struct.unpack_from("!I", seg, l3 + h.TCP_SEQ)[0]
        struct.pack_into("!I", seg, l3 + h.TCP_SEQ, (seq + 1 + where % 1000) & 0xFFFFFFFF)
        fix_checksums(seg, v6)
        rows[i] = bytearray(PREFIX + seg)
    elif flaw == "short":
        if len(segs) < 3 or len(seg) - 1 <= len(segs[-1]):
            return  # no middle row, or shortening it would not make it shorter than a full row
        seg = seg[:-1]
        fix_checksums(seg, v6)
        rows[middle] = bytearray(PREFIX + seg)
    else:
        rows[where % len(rows)][where % len(PREFIX)] ^= 0x80
    batch = laid_out([bytes(r[len(PREFIX) :]) for r in rows], b"", end_to_end)
    prefixed = laid_out([bytes(r) for r in rows], b"", end_to_end)
    assert coalesce_run(prefixed, len(PREFIX)) is None
    if not in_prefix:
        assert coalesce_run(batch) is None


def test_more_than_64_kib_is_two_superpackets() -> None:
    """Two back-to-back superpackets of one flow (80 KB together): coalesce_run declines, the row-by-row
    path cuts the run where 64 KiB would be passed."""
    a = build_tcp(v6=False, payload=payload_bytes(1, 40 * 1000), mss=1000, seq=5)
    b = build_tcp(v6=False, payload=payload_bytes(2, 40 * 1000), mss=1000, seq=5 + 40 * 1000)
    segs = reference.split(a.raw, a.vh) + reference.split(b.raw, b.vh)
    batch = PacketBatch.from_packets(segs, headroom=16)
    assert coalesce_run(batch) is None
    out = [b"".join(bytes(x) for x in w) for w in coalesce(batch)]
    assert len(out) == 2 and sum(len(o) - 10 - 40 for o in out) == 80 * 1000


@pytest.mark.parametrize("fix_header_checksum", [False, True])
def test_a_middle_row_with_another_ip_id(fix_header_checksum: bool) -> None:
    """The IP id may differ (the merged packet takes row 0's); a header checksum that no longer matches
    may not."""
    sp = build_tcp(v6=False, payload=payload_bytes(3, 10 * 1000 + 1), mss=1000, seq=9)
    segs = [bytearray(s) for s in reference.split(sp.raw, sp.vh)]
    struct.pack_into("!H", segs[4], h.IPV4_ID, 0xBEEF)
    if fix_header_checksum:
        fix_checksums(segs[4], v6=False)
    run = coalesce_run(laid_out([bytes(s) for s in segs], PREFIX, end_to_end=True), len(PREFIX))
    if fix_header_checksum:
        assert run is not None and bytes(run) == sp.vh.encode() + sp.raw
    else:
        assert run is None


@pytest.mark.parametrize("where", ["payload", "ip-id"])
def test_a_full_last_row_is_checked_with_the_others(where: str) -> None:
    """Whole segments (the last as long as the rest, summed together with them): a flipped payload byte or
    a changed IP id in that last row refuses the train, as in a shorter last row."""
    sp = build_tcp(v6=False, payload=payload_bytes(4, 8 * 1000), mss=1000, seq=77)
    segs = [bytearray(s) for s in reference.split(sp.raw, sp.vh)]
    clean = laid_out([bytes(s) for s in segs], PREFIX, end_to_end=True)
    assert bytes(coalesce_run(clean, len(PREFIX))) == sp.vh.encode() + sp.raw
    if where == "payload":
        segs[-1][-5] ^= 0x40
    else:
        struct.pack_into("!H", segs[-1], h.IPV4_ID, 0x1234)
    assert coalesce_run(laid_out([bytes(s) for s in segs], PREFIX, end_to_end=True), len(PREFIX)) is None


@given(t=trains(), cut=st.integers(0, 10**6))
@SETTINGS
def test_two_runs_of_one_superpacket_join_into_it(t: tuple[list[bytes], bytes, bool], cut: int) -> None:
    """A superpacket sent as two UDP_SEGMENT messages arrives as two trains: their runs join into exactly
    the superpacket; the other way round, or with a segment missing at the cut, they do not."""
    segs, superpacket, _ = t
    if len(segs) < 4:
        return
    k = 2 + cut % (len(segs) - 3)  # both parts at least two rows (coalesce_run's minimum)

    def run(part: list[bytes]) -> memoryview:
        got = coalesce_run(laid_out(part, b"", True))
        assert got is not None
        return got

    # Fresh runs for every join: a run is a buffer of its own, whatever backs it.
    for first in (run(segs[:k]), memoryview(bytearray(run(segs[:k])))):
        joined = join_runs(first, run(segs[k:]))
        assert joined is not None and bytes(joined) == superpacket
    assert join_runs(run(segs[k:]), run(segs[:k])) is None
    if len(segs) - k >= 3:
        assert join_runs(run(segs[:k]), run(segs[k + 1 :])) is None  # a segment missing at the cut


@pytest.mark.parametrize("case", ["psh-first", "other-port", "other-mss", "past-64k", "short-first"])
def test_runs_that_are_not_one_superpacket_do_not_join(case: str) -> None:
    mss = 1000
    sp = build_tcp(v6=False, payload=payload_bytes(5, 20 * mss), mss=mss, seq=100)
    segs = [bytearray(s) for s in reference.split(sp.raw, sp.vh)]
    first, rest = segs[:10], segs[10:]
    if case == "psh-first":
        first[-1][h.IPV4_MIN_HLEN + h.TCP_FLAGS] |= h.TCP_PSH
        fix_checksums(first[-1], v6=False)
    elif case == "other-port":
        for s in rest:
            s[h.IPV4_MIN_HLEN + 1] ^= 1  # source port
            fix_checksums(s, v6=False)
    elif case == "other-mss":
        other = build_tcp(v6=False, payload=payload_bytes(6, 4 * 900), mss=900, seq=100 + 10 * mss)
        rest = [bytearray(s) for s in reference.split(other.raw, other.vh)]
    elif case == "past-64k":
        big = build_tcp(v6=False, payload=payload_bytes(7, 60 * mss), mss=mss, seq=100 + 10 * mss)
        rest = [bytearray(s) for s in reference.split(big.raw, big.vh)]
    else:
        first[-1] = first[-1][:-1]  # the first run's last segment short: its superpacket ended there
        fix_checksums(first[-1], v6=False)
    a = coalesce_run(laid_out([bytes(s) for s in first], b"", True))
    b = coalesce_run(laid_out([bytes(s) for s in rest], b"", True))
    assert a is not None and b is not None
    assert join_runs(a, b) is None
