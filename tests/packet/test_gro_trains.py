"""gro_trains against gro.coalesce_train: for several trains checked at once, every train that qualifies
gives the bytes coalesce_train gives for it alone, and every train that does not is one coalesce_train
would not write as one superpacket (or would refuse)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packet_builders import TCP_OPTIONS, build_tcp, fix_checksums, gro_superpackets, payload_bytes

from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gro import coalesce_train
from udpflannel.packet.gro_trains import coalesce_trains, out_arena

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOT = 65536 + 4096
INNER = 22  # as behind a VXLAN + Ethernet header


def lay_out(trains: list[list[bytes]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Receive slots holding each train's datagrams end to end (an INNER-byte prefix before every
    packet), as recvmmsg with UDP_GRO leaves them (and UdpReceiver's train sets: each last row zero past
    its datagram); then the [m, K, s] view, counts and last lengths."""
    slots = np.random.default_rng(7).integers(0, 256, (len(trains), SLOT), np.uint8)  # stale bytes
    s = INNER + len(trains[0][0])
    for j, segs in enumerate(trains):
        raw = b"".join(bytes(range(INNER)) + seg for seg in segs)
        slots[j, : len(raw)] = np.frombuffer(raw, np.uint8)
        slots[j, len(raw) : len(segs) * s] = 0  # the last row past its datagram, as train sets leave it
    counts = np.array([len(t) for t in trains], np.int64)
    lasts = np.array([INNER + len(t[-1]) for t in trains], np.int64)
    big = int(counts.max())
    rows = np.lib.stride_tricks.as_strided(slots, (len(trains), big, s), (slots.strides[0], s, 1))
    return slots, rows, counts, lasts


def alone(slots: np.ndarray, j: int, k: int, s: int, last: int) -> list[bytes] | None:
    view = slots[j, : k * s].reshape(k, s)
    lengths = np.full(k, s - INNER, np.int32)
    lengths[-1] = last - INNER
    writes = coalesce_train(PacketBatch(view, lengths, INNER, k))
    return None if writes is None else [b"".join(bytes(b) for b in w) for w in writes]


@st.composite
def train_sets(draw: st.DrawFn) -> list[list[bytes]]:
    v6 = draw(st.booleans())
    mss = draw(st.integers(200, 1448))
    options = draw(st.sampled_from(TCP_OPTIONS))
    trains = []
    for _ in range(draw(st.integers(1, 5))):
        sp = draw(gro_superpackets(v6=v6, mss=mss, options=options, max_segments=40))
        trains.append(reference.split(sp.raw, sp.vh))
    # Now and then a flaw: a flipped byte, a wrong flag, or a gap in the sequence numbers.
    flaw = draw(st.sampled_from(["none", "none", "byte", "psh", "seq"]))
    if flaw != "none":
        j = draw(st.integers(0, len(trains) - 1))
        i = draw(st.integers(0, len(trains[j]) - 1))
        seg = bytearray(trains[j][i])
        l3 = 40 if v6 else 20
        if flaw == "byte":
            seg[draw(st.integers(0, len(seg) - 1))] ^= draw(st.integers(1, 255))
        elif flaw == "psh":
            seg[l3 + 13] |= 0x08
        else:
            seg[l3 + 7] ^= 0x01
        trains[j][i] = bytes(seg)
    return trains


@given(trains=train_sets())
@SETTINGS
def test_each_train_as_coalesce_train_gives_it(trains: list[list[bytes]]) -> None:
    slots, rows, counts, lasts = lay_out(trains)
    s = rows.shape[2]
    merged = coalesce_trains(rows, counts, lasts, INNER, out_arena(len(trains)))
    wants = [alone(slots, j, int(counts[j]), s, int(lasts[j])) for j in range(len(trains))]
    if merged is None:  # the set as a whole is refused only when some train is not a clean run
        assert any(want is None or len(want) != 1 for want in wants)
        return
    for j, want in enumerate(wants):
        got = merged.writes[j]
        if got is not None:
            assert bool(merged.ok[j])
            assert want == [bytes(got)]
        else:
            assert want is None or len(want) != 1 or not _clean(trains[j])


def _clean(segs: list[bytes]) -> bool:
    """The train is what a sender's split makes: row 0 with ACK alone (coalesce_train also merges a run
    whose first segment carries PSH, which train sets leave to it)."""
    l3 = 40 if segs[0][0] >> 4 == 6 else 20
    return segs[0][l3 + 13] == 0x10


def test_a_clean_set_merges_every_train() -> None:
    trains = []
    for seed in range(4):
        sp = build_tcp(v6=False, payload=payload_bytes(seed, 20 * 1000 + 17), mss=1000, seq=seed * 99)
        trains.append(reference.split(sp.raw, sp.vh))
    slots, rows, counts, lasts = lay_out(trains)
    merged = coalesce_trains(rows, counts, lasts, INNER, out_arena(4))
    assert merged is not None and merged.ok.all()
    for j, sp_segs in enumerate(trains):
        assert [bytes(merged.writes[j])] == alone(slots, j, len(sp_segs), rows.shape[2], int(lasts[j]))
        assert bytes(merged.writes[j])[10:].startswith(reference.coalesce_run(sp_segs)[10:30])


@pytest.mark.parametrize("where", ["middle", "last"])
def test_same_prefix_holds_each_datagram_to_its_row_0s_prefix(where: str) -> None:
    """same_prefix: a datagram whose prefix (e.g. its VXLAN header) is not its train's row 0's keeps that
    train out, and only that one; without it the prefix is not looked at."""
    trains = []
    for seed in range(3):
        sp = build_tcp(v6=False, payload=payload_bytes(seed, 12 * 1000 + 5), mss=1000, seq=seed * 7)
        trains.append(reference.split(sp.raw, sp.vh))
    slots, rows, counts, lasts = lay_out(trains)
    clean = coalesce_trains(rows, counts, lasts, INNER, out_arena(3), same_prefix=True)
    assert clean is not None and clean.ok.tolist() == [True, True, True]
    row = 5 if where == "middle" else int(counts[1]) - 1
    slots[1, row * rows.shape[2] + 4] ^= 0x40  # a byte of its prefix (a VXLAN VNI byte, say)
    held = coalesce_trains(rows, counts, lasts, INNER, out_arena(3), same_prefix=True)
    assert held is not None and held.ok.tolist() == [True, False, True]
    assert held.writes[1] is None
    loose = coalesce_trains(rows, counts, lasts, INNER, out_arena(3))
    assert loose is not None and loose.ok.all()
    for j in (0, 2):
        assert bytes(held.writes[j]) == bytes(loose.writes[j])


def test_mixed_versions_are_left_to_the_caller() -> None:
    a = build_tcp(v6=False, payload=payload_bytes(1, 5000), mss=1000)
    b = build_tcp(v6=True, payload=payload_bytes(2, 5000), mss=980)  # same datagram size as a's
    trains = [reference.split(a.raw, a.vh), reference.split(b.raw, b.vh)]
    assert len(trains[0][0]) == len(trains[1][0])
    _, rows, counts, lasts = lay_out(trains)
    assert coalesce_trains(rows, counts, lasts, INNER, out_arena(2)) is None


@pytest.mark.parametrize("where", ["second", "last"])
def test_a_sequence_gap_keeps_that_train_apart(where: str) -> None:
    """A gap before the second or before the last datagram (TCP checksum made right again): that train
    is not merged, its neighbours are."""
    trains = []
    for seed in range(3):
        sp = build_tcp(v6=False, payload=payload_bytes(seed, 6 * 1000 + 5), mss=1000, seq=seed * 7)
        trains.append(reference.split(sp.raw, sp.vh))
    i = 1 if where == "second" else len(trains[1]) - 1
    seg = bytearray(trains[1][i])
    struct.pack_into("!I", seg, 24, struct.unpack_from("!I", seg, 24)[0] + 1)
    fix_checksums(seg, v6=False)
    trains[1][i] = bytes(seg)
    _, rows, counts, lasts = lay_out(trains)
    merged = coalesce_trains(rows, counts, lasts, INNER, out_arena(3))
    assert merged is not None and merged.ok.tolist() == [True, False, True]


def _stream(segments: int, mss: int, seq: int, seed: int, last: int | None = None) -> list[bytes]:
    sp = build_tcp(
        v6=False,
        payload=payload_bytes(seed, (segments - 1) * mss + (last or mss)),
        mss=mss,
        seq=seq,
        options=TCP_OPTIONS[1],
    )
    return reference.split(sp.raw, sp.vh)


def test_a_train_longer_than_64_kib_is_refused_and_its_neighbours_merge() -> None:
    """A kernel VXLAN peer's stream arrives as GRO trains cut at 64 KiB, and the receive may append the
    next message to a train (io.udp_recv.append_rests): 44 + 3 full segments of one flow, in sequence, are
    more than one superpacket holds. That train is refused; the others in the set are still merged."""
    mss = 1398
    long_train = _stream(44, mss, 1000, 1) + _stream(3, mss, 1000 + 44 * mss, 2)
    trains = [_stream(5, mss, 7, 3), long_train, _stream(9, mss, 99, 4, last=100)]
    slots, rows, counts, lasts = lay_out(trains)
    merged = coalesce_trains(rows, counts, lasts, INNER, out_arena(3))
    assert merged is not None and merged.ok.tolist() == [True, False, True]
    s = rows.shape[2]
    for j in (0, 2):
        assert [bytes(merged.writes[j])] == alone(slots, j, int(counts[j]), s, int(lasts[j]))


def test_a_superpacket_whose_short_last_segment_ends_near_64_kib_is_whole() -> None:
    """46 full segments and a short one: the superpacket fits 64 KiB, but not 47 full rows would."""
    mss = 1398
    trains = [_stream(47, mss, 1000, 5, last=500), _stream(47, mss, 5, 6, last=1100)]
    slots, rows, counts, lasts = lay_out(trains)
    merged = coalesce_trains(rows, counts, lasts, INNER, out_arena(2))
    assert merged is not None and merged.ok.all()
    for j in range(2):
        assert [bytes(merged.writes[j])] == alone(slots, j, 47, rows.shape[2], int(lasts[j]))
