"""Array transport path (rows.py): the same bytes as seal_batch, the same deliveries and drops as
open_batch, GRO trains opened in place, and replay runs equal to counter-by-counter checks."""

from __future__ import annotations

import random

import numpy as np
import pytest
from wg_helpers import ENDPOINT_A, Pair, ipv4_packet, make_pair

from udpflannel.codec.wireguard import messages as m
from udpflannel.codec.wireguard.batch import open_batch, seal_batch, sealed_size
from udpflannel.codec.wireguard.events import DropReason, HandshakeCompleted, Queued
from udpflannel.codec.wireguard.replay import Filter
from udpflannel.codec.wireguard.rows import SealedRows, open_rows, seal_rows
from udpflannel.packet.batch import PacketBatch

LIMIT = (1 << 64) - (1 << 13) - 1


def established(mtu: int = 0) -> Pair:
    p = make_pair()
    p.a.mtu = p.b.mtu = mtu
    p.deliver(p.a, p.a.initiate(p.b.identity.public, p.now))
    return p


def seal(p: Pair, packets: list[bytes], headroom: int = 8) -> SealedRows:
    batch = PacketBatch.from_packets(packets, headroom)
    out = np.zeros(len(packets) * 2048, np.uint8)
    res = seal_rows(p.a, p.b.identity.public, batch.buf, headroom, batch.lengths, out, p.now)
    assert isinstance(res, SealedRows)
    return res


def messages(res: SealedRows) -> list[bytes]:
    return [res.rows[i, :z].tobytes() for i, z in enumerate(res.sizes)]


@pytest.mark.parametrize("mtu", [0, 1420])
@pytest.mark.parametrize(
    "lengths",
    [[1400] * 5 + [333], [100, 100, 100, 37], [64], [20, 1400, 20, 700, 1420], [1420, 1420]],
    ids=["superpacket", "equal-short-tail", "one", "mixed", "full-mtu"],
)
def test_seal_rows_matches_seal_batch(mtu: int, lengths: list[int]) -> None:
    p1, p2 = established(mtu), established(mtu)
    packets = [ipv4_packet(n - 20, fill=i + 1) for i, n in enumerate(lengths)]
    res = seal(p1, packets)
    out = bytearray(sealed_size(p2.a, lengths))
    ref = seal_batch(p2.a, p2.b.identity.public, packets, out, p2.now)
    assert res.sizes == ref.sizes
    assert b"".join(messages(res)) == bytes(out)
    equal = all(n == lengths[0] for n in lengths[:-1]) and lengths[-1] <= lengths[0]
    assert res.contiguous == equal
    if equal:  # back to back: one UDP_SEGMENT buffer
        assert res.flat.tobytes() == bytes(out)
        assert res.stride == res.sizes[0]
    assert p1.a.peers[p1.b.identity.public].stats.tx_bytes == p2.a.peers[p2.b.identity.public].stats.tx_bytes


def test_seal_rows_index_picks_rows_and_queues_without_session() -> None:
    p = established()
    packets = [ipv4_packet(n, fill=n) for n in (10, 20, 30, 40)]
    batch = PacketBatch.from_packets(packets, 16)
    out = np.zeros(8192, np.uint8)
    index = np.array([3, 1])
    res = seal_rows(p.a, p.b.identity.public, batch.buf, 16, batch.lengths[index], out, p.now, index)
    assert isinstance(res, SealedRows)
    got = open_batch(p.b, [memoryview(bytearray(x)) for x in messages(res)], ENDPOINT_A, p.now)
    assert [bytes(v) for _, v in got.delivered] == [packets[3], packets[1]]
    fresh = make_pair()
    queued = seal_rows(fresh.a, fresh.b.identity.public, batch.buf, 16, batch.lengths, out, fresh.now)
    assert isinstance(queued, Queued)
    assert list(fresh.a.peers[fresh.b.identity.public].staged) == packets


def train(res: SealedRows) -> tuple[np.ndarray, int]:
    """The messages as UDP_GRO hands them over: one buffer cut into rows of the first message's size."""
    data = b"".join(messages(res))
    s = res.sizes[0]
    k = -(-len(data) // s)
    buf = np.zeros(k * s + 64, np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    return buf[: k * s].reshape(k, s), len(data) - (k - 1) * s


def test_open_rows_train_in_place() -> None:
    p = established(1420)
    packets = [ipv4_packet(1380, fill=i) for i in range(7)] + [ipv4_packet(200, fill=99)]
    sealed = seal(p, packets)
    rows, last = train(sealed)
    replayed = rows.copy()
    peer = p.b.peers[p.a.identity.public]
    before = peer.stats.rx_bytes
    opened = open_rows(p.b, rows, last, ENDPOINT_A, p.now)
    assert opened is not None and opened.keep is None and opened.delivered == 8
    assert opened.peer == p.a.identity.public
    assert [rows[i, 16 : 16 + n].tobytes() for i, n in enumerate(opened.lengths.tolist())] == packets
    assert peer.stats.rx_bytes - before == sum(sealed.sizes)
    # The same train again is a replay of every row.
    assert open_rows(p.b, replayed, last, ENDPOINT_A, p.now).delivered == 0
    assert p.b.drops[DropReason.REPLAY] == 8


def mutate(rows: np.ndarray, case: str) -> None:
    if case == "tag":
        rows[2, -1] ^= 1
    elif case == "duplicate":
        rows[3] = rows[1]


@pytest.mark.parametrize("case", ["tag", "duplicate", "inner_length", "spoofed", "keepalive", "v6"])
def test_open_rows_delivers_and_drops_as_open_batch(case: str) -> None:
    p1, p2 = established(), established()
    for p in (p1, p2):
        p.b.peers[p.a.identity.public].set_allowed_ips(["198.19.1.0/24", "fd00:198:19:1::/64"])
    size = 100
    packets = [ipv4_packet(size, fill=i) for i in range(6)]
    if case == "inner_length":
        bad = bytearray(packets[4])
        bad[2:4] = (9000).to_bytes(2, "big")  # longer than the message
        packets[4] = bytes(bad)
    elif case == "spoofed":
        packets[1] = ipv4_packet(size, src="198.19.7.7")
    elif case == "keepalive":
        packets = [b""] * 4
    elif case == "v6":
        v6 = bytes([0x60, 0, 0, 0]) + (size - 20).to_bytes(2, "big") + bytes([17, 64])
        src = bytes.fromhex("fd000198001900010000000000000001")
        packets = [v6 + src + src + bytes(size - 20) for _ in range(3)]
        packets.append(v6 + bytes.fromhex("fd000198001900090000000000000001") + src + bytes(size - 20))
    # Both pairs share keys and randomness, so they seal identical bytes.
    rows, last = train(seal(p1, packets))
    ref_rows, _ = train(seal(p2, packets))
    assert np.array_equal(rows, ref_rows)
    if case in ("tag", "duplicate"):
        mutate(rows, case)
        mutate(ref_rows, case)
    opened = open_rows(p1.b, rows, last, ENDPOINT_A, p1.now)
    widths = [ref_rows.shape[1]] * (len(ref_rows) - 1) + [last]
    views = [memoryview(ref_rows[i, :w]) for i, w in enumerate(widths)]
    ref = open_batch(p2.b, views, ENDPOINT_A, p2.now)
    assert opened is not None
    keep = np.ones(len(rows), bool) if opened.keep is None else opened.keep
    got = [rows[i, 16 : 16 + n].tobytes() for i, n in enumerate(opened.lengths.tolist()) if keep[i]]
    assert got == [bytes(v) for _, v in ref.delivered]
    assert p1.b.drops == p2.b.drops
    assert p1.b.peers[p1.a.identity.public].stats.rx_bytes == p2.b.peers[p2.a.identity.public].stats.rx_bytes
    expected_drops = {
        "tag": DropReason.DECRYPT_FAILED,
        "duplicate": DropReason.REPLAY,
        "inner_length": DropReason.BAD_INNER_PACKET,
        "spoofed": DropReason.NOT_ALLOWED_IP,
        "v6": DropReason.NOT_ALLOWED_IP,
    }
    if case in expected_drops:
        assert p1.b.drops[expected_drops[case]] == 1
    else:
        assert got == [] and not p1.b.drops


def test_open_rows_declines_mixed_trains_and_confirms_session() -> None:
    p = established()
    rows, last = train(seal(p, [ipv4_packet(50)] * 3))
    rows[1, 0] = m.MESSAGE_INITIATION_TYPE
    assert open_rows(p.b, rows, last, ENDPOINT_A, p.now) is None  # not all transport: open_batch's job
    rows, last = train(seal(p, [ipv4_packet(50)] * 3))
    rows[2, 4] ^= 1
    assert open_rows(p.b, rows, last, ENDPOINT_A, p.now) is None  # two receiver indices
    # The responder's first data under a new keypair confirms the handshake, as open_batch does.
    q = make_pair()
    init = q.a.initiate(q.b.identity.public, q.now)
    resp = q.b.receive_datagram(init[0].data, ENDPOINT_A, q.now)
    q.a.receive_datagram(resp[0].data, ("198.18.0.2", 51820), q.now)
    rows, last = train(seal(q, [ipv4_packet(50)] * 4))
    opened = open_rows(q.b, rows, last, ENDPOINT_A, q.now)
    assert opened is not None and opened.delivered == 4
    assert any(isinstance(e, HandshakeCompleted) for e in opened.events)
    unknown = make_pair()
    assert open_rows(unknown.b, rows, last, ENDPOINT_A, unknown.now).delivered == 0
    assert unknown.b.drops[DropReason.UNKNOWN_INDEX] == 4


def test_accept_run_equals_counter_by_counter() -> None:
    rng = random.Random(7)
    fast, slow = Filter(), Filter()
    counter = 0
    for _ in range(400):
        counter += rng.choice([1, 1, 1, 2, 63, 64, 65, 5000, 9000])
        count = rng.choice([1, 2, 44, 64, 130])
        expected = [slow.validate_counter(c, LIMIT) for c in range(counter, counter + count)]
        if not fast.accept_run(counter, count, LIMIT):
            got = [fast.validate_counter(c, LIMIT) for c in range(counter, counter + count)]
        else:
            got = [True] * count
        assert got == expected
        assert (fast.last, fast.ring) == (slow.last, slow.ring)
        counter += count - 1
    # Nothing changes when the run is not entirely new or crosses the limit.
    f = Filter()
    assert f.validate_counter(10, LIMIT)
    assert not f.accept_run(5, 10, LIMIT) and not f.accept_run(11, 10, 15)
    assert f.last == 10


def test_view_cache_gives_the_same_bytes_and_deliveries() -> None:
    from udpflannel.codec.wireguard.rows import ViewCache

    p1, p2 = established(1420), established(1420)
    packets = [ipv4_packet(1380, fill=i) for i in range(5)] + [ipv4_packet(99, fill=7)]
    batch = PacketBatch.from_packets(packets, 8)
    outs = [np.zeros(64 * 1500, np.uint8) for _ in range(2)]
    cache = ViewCache(outs[0], 64)
    results = []
    for _ in range(2):  # the second batch reuses the cached views
        with_views = seal_rows(
            p1.a, p1.b.identity.public, batch.buf, 8, batch.lengths, outs[0], p1.now, None, cache
        )
        plain = seal_rows(p2.a, p2.b.identity.public, batch.buf, 8, batch.lengths, outs[1], p2.now)
        assert isinstance(with_views, SealedRows) and isinstance(plain, SealedRows)
        assert with_views.flat.tobytes() == plain.flat.tobytes()
        results.append(with_views.flat.tobytes())
    assert results[0] != results[1]  # new counters, new ciphertext
    # Open the second batch in place inside a bigger arena at an offset, through a cache over the arena.
    arena = np.zeros(200_000, np.uint8)
    base = 70_000
    data = np.frombuffer(results[1], np.uint8)
    s = plain.sizes[0]
    k = len(plain.sizes)
    arena[base : base + len(data)] = data
    rows = arena[base : base + k * s].reshape(k, s)
    opened = open_rows(p1.b, rows, plain.sizes[-1], ENDPOINT_A, p1.now, ViewCache(arena, 64), base)
    # p1.b has not seen the first batch: only the second is fresh; counters 6.. are accepted.
    assert opened is not None and opened.delivered == k
    assert [rows[i, 16 : 16 + n].tobytes() for i, n in enumerate(opened.lengths.tolist())] == packets
