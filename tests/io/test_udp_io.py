"""UDP GSO send / GRO receive between two namespaces, against the per-datagram fallback, plus the pure
helpers (call chunking, sockaddr codec)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from udpflannel.io import linux
from udpflannel.io.mmsg import decode_sockaddr, encode_sockaddr
from udpflannel.io.udp import LoneDatagram, Received, UdpSocket, _gso_calls
from udpflannel.lab.netns import Lab, call_in_netns
from udpflannel.packet.batch import PacketBatch

PORT = 4789


def _payloads(count: int, size: int, tail: int) -> list[bytes]:
    rng = np.random.default_rng(count * 7 + size)
    return [rng.integers(0, 256, size, np.uint8).tobytes() for _ in range(count)] + [b"\x01" * tail]


def _receive_all(rx: UdpSocket, want: int, timeout: float = 5.0) -> tuple[list[bytes], list[tuple[str, int]]]:
    got: list[bytes] = []
    sources: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        r = rx.recv_batch()
        if r.batch.n == 0:
            time.sleep(0.01)
            continue
        got += r.batch.packets()
        sources += [r.source(i) for i in range(r.batch.n)]
        assert r.sources() == [s for s, _ in sources[-r.batch.n :]]
    return got, sources


def _first_receive(rx: UdpSocket, **options: bool) -> list:
    """The records of the first recv_trains(**options) that finds something (within 5 s; [] if none)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if recs := rx.recv_trains(**options):
            return recs
        time.sleep(0.01)
    return []


Pair = tuple[Lab, str, str]  # the lab and two namespaces joined by a veth (198.18.0.1 - 198.18.0.2)


@pytest.fixture
def pair(lab: Lab) -> Pair:
    a, b = lab.netns("a"), lab.netns("b")
    lab.veth(a, b, "198.18.0.1/24", "198.18.0.2/24")
    return lab, a.name, b.name


OpenUdp = Callable[..., UdpSocket]


@pytest.fixture
def open_udp() -> Iterator[OpenUdp]:
    """open_udp(ns, addr, port, **offloads): a UdpSocket (IPv4 or IPv6, as addr is) bound in a namespace,
    closed after the test."""
    opened: list[UdpSocket] = []

    def open_in(ns: str, addr: str, port: int, **kw: bool) -> UdpSocket:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = call_in_netns(ns, lambda: UdpSocket.open(family, addr, port, **kw))
        opened.append(sock)
        return sock

    yield open_in
    for sock in opened:
        sock.close()


@pytest.mark.root
@pytest.mark.parametrize("offload", [True, False], ids=["gso-gro", "fallback"])
def test_gso_send_gro_receive_in_order(pair: Pair, open_udp: OpenUdp, offload: bool) -> None:
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=offload, gro=offload)
    rx = open_udp(b, "198.18.0.2", PORT, gso=offload, gro=offload)
    assert tx.gso is offload and rx.gro is offload
    if offload:
        assert tx.max_segments in linux.UDP_MAX_SEGMENTS_CANDIDATES
    sent = _payloads(300, 1400, 333)
    batch = PacketBatch.from_packets(sent, headroom=50)
    assert tx.send_segments(batch, 1400, ("198.18.0.2", PORT)) == len(sent)
    if offload:
        # 46 segments of 1400 bytes fit under the 65507-byte payload limit: ceil(300/46) + tail
        assert tx.stats.send_calls <= 8
    got, sources = _receive_all(rx, len(sent))
    assert got == sent
    assert {s for s, _ in sources} == {"198.18.0.1"}
    assert {p for _, p in sources} == {tx.address[1]}
    if offload:
        assert rx.stats.recv_calls < len(sent) // 4  # trains, not one datagram per call
    assert tx.stats.gso_fallbacks == 0


@pytest.mark.root
@pytest.mark.parametrize("offload", [True, False], ids=["gso", "fallback"])
def test_send_packed_cuts_one_buffer_into_datagrams(pair: Pair, open_udp: OpenUdp, offload: bool) -> None:
    """One buffer of 130 x 1000 bytes + a 7-byte tail: the datagrams arrive as if sent one by one, as
    UDP_SEGMENT messages of as many as the limits allow (65507 // 1000 = 65 a message), all in one call."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=offload)
    rx = open_udp(b, "198.18.0.2", PORT, gro=offload)
    sent = _payloads(130, 1000, 7)
    assert tx.send_packed(b"".join(sent), 1000, ("198.18.0.2", PORT)) == len(sent)
    got, _ = _receive_all(rx, len(sent))
    assert got == sent
    assert tx.stats.sent == len(sent)
    if offload:
        assert tx.stats.send_calls == 1
    assert tx.send_packed(b"x" * 10, 10, ("198.18.0.2", PORT)) == 1
    assert _receive_all(rx, 1)[0] == [b"x" * 10]


@pytest.mark.root
@pytest.mark.parametrize("offload", [True, False], ids=["gro", "no-gro"])
def test_recv_trains_gives_views_of_trains_in_order(pair: Pair, open_udp: OpenUdp, offload: bool) -> None:
    """Trains come back as zero-copy views (offset 0, one row per datagram, rows a segment wide); single
    datagrams are copied (or, a few at a time, left in their receive slots); either way every datagram
    arrives once, in order, with its source."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=True)
    rx = open_udp(b, "198.18.0.2", PORT, gro=offload)
    sent = [*_payloads(40, 1200, 500), b"one", *_payloads(20, 900, 0)[:-1]]
    dest = ("198.18.0.2", PORT)
    assert tx.send_segments(sent[:41], 1200, dest) == 41
    assert tx.send_segments(sent[41:42], 3, dest) == 1
    assert tx.send_segments(sent[42:], 900, dest) == 20
    got: list[bytes] = []
    views = 0
    deadline = time.monotonic() + 5
    while len(got) < len(sent) and time.monotonic() < deadline:
        recs = rx.recv_trains()
        if not recs:
            time.sleep(0.01)
        for r in recs:
            views += r.batch.offset == 0 and r.batch.stride <= 1200  # a train: rows a segment wide
            got += r.batch.packets()  # consumed before the next receive, as the engine does
            assert {r.source(i) for i in range(r.batch.n)} == {("198.18.0.1", tx.address[1])}
    assert got == sent
    assert rx.stats.received == len(sent)
    assert (views > 0) is offload


@pytest.mark.root
def test_a_buffer_sent_as_two_messages_is_received_as_one_train(pair: Pair, open_udp: OpenUdp) -> None:
    """47 datagrams of 1472 bytes (a 64 KiB TCP superpacket's VXLAN datagrams) go as two UDP_SEGMENT
    messages, 44 + 3 (65507 bytes a message), and the kernel's GRO keeps them apart; the receiver makes
    them one train again (udp_recv.append_rests)."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=True)
    rx = open_udp(b, "198.18.0.2", PORT, gro=True)
    sent = _payloads(46, 1472, 1000)
    assert tx.send_packed(b"".join(sent), 1472, ("198.18.0.2", PORT)) == len(sent)
    time.sleep(0.1)  # both messages queued before the one receive
    recs = rx.recv_trains(sets=True)
    assert [r.batch.n for r in recs] == [47]
    assert recs[0].batch.packets() == sent and recs[0].batch.offset == 0  # a view of the receive slot
    assert rx.stats.rests_appended == 1


@pytest.mark.root
def test_a_few_datagrams_are_passed_on_where_they_lie(pair: Pair, open_udp: OpenUdp) -> None:
    """Up to SINGLES_MAX one-datagram messages: one batch over the receive slots, nothing copied."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=False)
    rx = open_udp(b, "198.18.0.2", PORT, gro=True)
    sent = [bytes([i]) * (40 + i) for i in range(5)]
    assert tx.sendmmsg([(p, ("198.18.0.2", PORT)) for p in sent]) == 5
    time.sleep(0.05)  # all five queued before the one receive
    recs = _first_receive(rx)
    assert len(recs) == 1 and recs[0].batch.offset == 0
    assert recs[0].batch.buf.base is not None  # a view of the arena, not a copy
    assert recs[0].batch.packets() == sent
    assert {recs[0].source(i) for i in range(5)} == {("198.18.0.1", tx.address[1])}
    assert rx.stats.received == 5


@pytest.mark.root
@pytest.mark.parametrize("gro", [True, False])
def test_the_one_datagram_of_a_receive_comes_as_a_lone_datagram(
    pair: Pair, open_udp: OpenUdp, gro: bool
) -> None:
    """recv_trains(lone=True): a receive of one datagram is a LoneDatagram (a view of its slot, its source
    as bytes), counted once whether or not it is later taken as a Received; two datagrams are a batch."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=False)
    rx = open_udp(b, "198.18.0.2", PORT, gro=gro)
    dest = ("198.18.0.2", PORT)
    assert tx.send_one(b"ping" * 20, dest) == 1
    (lone,) = _first_receive(rx, sets=True, lone=True)
    assert isinstance(lone, LoneDatagram) and lone.length == 80
    assert bytes(lone.row[: lone.length]) == b"ping" * 20 and lone.source == bytes([198, 18, 0, 1])
    got = lone.received()
    assert got.batch.packets() == [b"ping" * 20] and got.source(0) == ("198.18.0.1", tx.address[1])
    assert rx.stats.received == 1
    assert tx.sendmmsg([(b"a" * 40, dest), (b"b" * 41, dest)]) == 2
    time.sleep(0.05)  # both queued before the one receive
    (both,) = _first_receive(rx, sets=True, lone=True)
    assert isinstance(both, Received) and both.batch.packets() == [b"a" * 40, b"b" * 41]
    assert rx.stats.received == 3


@pytest.mark.root
def test_drained_says_whether_a_receive_took_everything_waiting(pair: Pair, open_udp: OpenUdp) -> None:
    """drained: the last receive got fewer messages than it asked for, so none was left waiting."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=False)
    rx = open_udp(b, "198.18.0.2", PORT, gro=False)
    assert tx.sendmmsg([(bytes([i]) * 40, ("198.18.0.2", PORT)) for i in range(5)]) == 5
    time.sleep(0.05)  # all five queued
    first = rx.recv_batch(max_messages=3)
    assert first.batch.n == 3 and not rx.drained
    rest = rx.recv_batch(max_messages=3)
    assert rest.batch.n == 2 and rx.drained
    assert rx.recv_batch(max_messages=3).batch.n == 0 and rx.drained


@pytest.mark.root
def test_send_rows_sends_chosen_rows_of_a_buffer(pair: Pair, open_udp: OpenUdp) -> None:
    """Rows 1, 3, 4, ... of a batch, each from 4 bytes before its packet (an encapsulation header), one
    datagram per row, in order; the iovecs are computed from the buffer address."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=False)
    rx = open_udp(b, "198.18.0.2", PORT, gro=False)
    payloads = [bytes([i]) * (20 + 7 * i) for i in range(40)]
    batch = PacketBatch.from_packets(payloads, headroom=8)
    batch.buf[:, 4:8] = 0xEE
    rows = np.array([i for i in range(40) if i % 3], dtype=np.int64)
    lengths = batch.lengths[rows] + 4
    assert tx.send_rows(batch.buf, rows, 4, lengths, ("198.18.0.2", PORT)) == len(rows)
    got, _ = _receive_all(rx, len(rows))
    assert got == [b"\xee" * 4 + payloads[i] for i in rows.tolist()]
    assert tx.stats.send_calls == 1 and tx.stats.sent == len(rows)


@pytest.mark.root
@pytest.mark.parametrize("offload", [True, False], ids=["gso", "fallback"])
def test_send_rows_gso_sends_equal_rows_as_segments(pair: Pair, open_udp: OpenUdp, offload: bool) -> None:
    """300 chosen rows of 64 bytes (more than one UDP_SEGMENT message holds: several messages in one
    sendmmsg) and a shorter last one arrive as 301 datagrams, in order; without GSO, the same datagrams."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=offload)
    rx = open_udp(b, "198.18.0.2", PORT, gro=False)
    payloads = [bytes([i % 251]) * 60 for i in range(600)]
    payloads[-1] = b"\x07" * 33
    batch = PacketBatch.from_packets(payloads, headroom=8)
    batch.buf[:, 4:8] = 0xEE
    rows = np.array([*range(0, 598, 2), 599], dtype=np.int64)
    assert tx.send_rows_gso(batch.buf, rows, 4, 64, 37, ("198.18.0.2", PORT)) == len(rows)
    got, _ = _receive_all(rx, len(rows))
    assert got == [b"\xee" * 4 + payloads[i] for i in rows.tolist()]
    assert tx.stats.sent == len(rows) and tx.stats.send_calls == 1  # one sendmmsg either way


@pytest.mark.root
@pytest.mark.parametrize("offload", [True, False], ids=["gso", "fallback"])
def test_send_spans_sends_runs_of_a_buffer_in_one_call(pair: Pair, open_udp: OpenUdp, offload: bool) -> None:
    """Three packed runs of 1472-byte datagrams in one buffer (superpackets of 47, 10 and 1 datagrams, each
    ending shorter), with gaps between them: every datagram, in order; with GSO, one sendmmsg."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0, gso=offload)
    rx = open_udp(b, "198.18.0.2", PORT, gro=False)
    seg = 1472
    data = np.random.default_rng(7).integers(0, 256, 70 * seg, np.uint8)
    spans = [(0, 46 * seg + 700), (47 * seg, 9 * seg + 1), (60 * seg, 300)]
    want = [data[a + c : a + min(c + seg, n)].tobytes() for a, n in spans for c in range(0, n, seg)]
    assert tx.send_spans(data, spans, seg, ("198.18.0.2", PORT)) == len(want) == 58
    assert _receive_all(rx, len(want))[0] == want
    if offload:
        assert tx.stats.send_calls == 1


@pytest.mark.root
def test_gso_and_fallback_put_the_same_datagrams_on_the_wire(pair: Pair, open_udp: OpenUdp) -> None:
    _, a, b = pair
    tx_gso = open_udp(a, "198.18.0.1", 0, gso=True)
    tx_plain = open_udp(a, "198.18.0.1", 0, gso=False)
    rx = open_udp(b, "198.18.0.2", PORT, gro=False)
    sent = _payloads(60, 999, 1)
    views = [memoryview(p) for p in sent]
    assert tx_gso.send_segments(views, 999, ("198.18.0.2", PORT)) == len(sent)
    via_gso, _ = _receive_all(rx, len(sent))
    assert tx_plain.send_segments(views, 999, ("198.18.0.2", PORT)) == len(sent)
    via_plain, _ = _receive_all(rx, len(sent))
    assert via_gso == via_plain == sent
    assert tx_plain.stats.send_calls < len(sent)  # sendmmsg batches them


@pytest.mark.root
def test_sendmmsg_to_several_destinations(pair: Pair, open_udp: OpenUdp) -> None:
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0)
    rx1 = open_udp(b, "198.18.0.2", PORT)
    rx2 = open_udp(b, "198.18.0.2", PORT + 1)
    items = [(bytes([i]) * (10 + i), ("198.18.0.2", PORT + i % 2)) for i in range(40)]
    assert tx.sendmmsg(items) == 40
    got1, _ = _receive_all(rx1, 20)
    got2, _ = _receive_all(rx2, 20)
    assert got1 == [p for p, d in items if d[1] == PORT]
    assert got2 == [p for p, d in items if d[1] == PORT + 1]


@pytest.mark.root
def test_no_offload_env_forces_fallback(
    pair: Pair, open_udp: OpenUdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, a, _ = pair
    monkeypatch.setenv(linux.NO_OFFLOAD_ENV, "1")
    s = open_udp(a, "198.18.0.1", 0)
    assert s.offloads == []


@pytest.mark.root
def test_gso_refusal_switches_to_fallback(pair: Pair, open_udp: OpenUdp) -> None:
    """A GSO send the kernel rejects (segment size too small for the count: EINVAL) is resent per datagram."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0)
    rx = open_udp(b, "198.18.0.2", PORT, gro=False)
    tx.max_segments = 10_000  # pretend the kernel allows more than it does: the send gets EINVAL
    sent = [bytes([i % 256]) * 8 for i in range(300)]
    assert tx.send_segments(sent, 8, ("198.18.0.2", PORT)) == 300
    assert tx.stats.gso_fallbacks == 1 and not tx.gso
    got, _ = _receive_all(rx, 300)
    assert got == sent


@pytest.mark.parametrize(
    ("lengths", "seg", "expect"),
    [
        ([100] * 5, 100, [(0, 5)]),
        ([100] * 5 + [40], 100, [(0, 6)]),
        ([100, 100, 40, 100, 100], 100, [(0, 3), (3, 5)]),
        ([100, 100, 150, 100], 100, [(0, 2), (2, 3), (3, 4)]),
        ([100] * 7, 100, [(0, 3), (3, 6), (6, 7)]),  # 3 segments per call
        ([150], 100, [(0, 1)]),
    ],
)
def test_gso_calls_respect_limits(lengths: list[int], seg: int, expect: list[tuple[int, int]]) -> None:
    calls = _gso_calls(np.array(lengths), seg, max_segments=3 if len(lengths) == 7 else 64, max_payload=65507)
    assert calls == expect
    covered = [i for a, b in calls for i in range(a, b)]
    assert covered == list(range(len(lengths)))


def test_gso_calls_payload_limit() -> None:
    calls = _gso_calls(np.full(100, 1472), 1472, max_segments=128, max_payload=65507)
    assert [b - a for a, b in calls] == [44, 44, 12]  # 44 * 1472 = 64768 <= 65507 < 45 * 1472


@pytest.mark.parametrize(
    ("family", "addr"), [(socket.AF_INET, "198.18.3.4"), (socket.AF_INET6, "fd00:198::9")]
)
def test_sockaddr_roundtrip(family: int, addr: str) -> None:
    raw = encode_sockaddr(family, addr, 8472)
    assert len(raw) == 28
    assert decode_sockaddr(raw) == (addr, 8472)


@pytest.mark.root
@pytest.mark.parametrize("offload", [True, False], ids=["gso-gro", "fallback"])
def test_ipv6_gso_gro(pair: Pair, open_udp: OpenUdp, offload: bool) -> None:
    lab, a, b = pair
    lab.namespaces["a"].exec("ip", "addr", "add", "fd00:198::1/64", "dev", "eth0", "nodad")
    lab.namespaces["b"].exec("ip", "addr", "add", "fd00:198::2/64", "dev", "eth0", "nodad")
    tx = open_udp(a, "fd00:198::1", 0, gso=offload, gro=offload)
    rx = open_udp(b, "fd00:198::2", PORT, gso=offload, gro=offload)
    sent = _payloads(100, 1200, 77)
    assert tx.send_segments(sent, 1200, ("fd00:198::2", PORT)) == len(sent)
    got, sources = _receive_all(rx, len(sent))
    assert got == sent
    assert {s for s, _ in sources} == {"fd00:198::1"}


@pytest.mark.root
def test_send_errors_are_counted_not_raised(pair: Pair, open_udp: OpenUdp) -> None:
    """A datagram larger than UDP allows, and a destination with no route, are refused by the kernel:
    both are counted, nothing raises, and the next send still works."""
    _, a, b = pair
    tx = open_udp(a, "198.18.0.1", 0)
    rx = open_udp(b, "198.18.0.2", PORT, gro=False)
    assert tx.sendmmsg([(bytes(70000), ("198.18.0.2", PORT))]) == 0
    assert tx.send_segments([b"x" * 10], 10, ("198.18.9.9", PORT)) == 0  # no route in the namespace
    assert tx.stats.send_errors == 2
    assert tx.send_segments([b"ok"], 2, ("198.18.0.2", PORT)) == 1
    got, _ = _receive_all(rx, 1)
    assert got == [b"ok"]
    assert rx.recv_batch().batch.n == 0  # nothing more waits: an empty batch, no exception
