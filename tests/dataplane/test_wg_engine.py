"""WgEngine in one process: the TUN is a SOCK_SEQPACKET socketpair (one message per packet, as a TUN read),
the underlay two UdpSockets on SERVICE_ADDR, the loopback of the module's own namespace (tests/conftest.py
private_net). Handshake on first packet, staged packets, peer grouping, a TCP superpacket split and sealed
as one batch, GRO on the receiving side, drops counted."""

from __future__ import annotations

import os
import time

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw
from wg_nodes import ADDR, MTU, Node, pump

from udpflannel.dataplane import wg_engine, wg_rx
from udpflannel.dataplane.wg_engine import WgPeerConfig
from udpflannel.io import linux
from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gro import coalesce
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_UDP_L4, VNET_HDR_LEN, VnetHdr

pytestmark = pytest.mark.usefixtures("private_net")  # the underlay in a namespace of the module's own


@pytest.fixture(params=[False, True], ids=["plain", "vnet"])
def pair(request):
    a, b = Node(1, request.param), Node(2, request.param)
    for x, y in ((a, b), (b, a)):
        cfg = WgPeerConfig(y.public_key, (ADDR, y.udp.address[1]), (y.subnet,))
        x.engine.set_peers([cfg], time.monotonic())
    yield a, b
    a.close()
    b.close()


def udp_packet(src: str, dst: str, n: int) -> bytes:
    return bytes(
        IP(src=src, dst=dst)
        / UDP(sport=1000, dport=2000)
        / Raw(bytes(range(256)) * (n // 256) + b"x" * (n % 256))
    )


def strip(node: Node, frames: list[bytes]) -> list[bytes]:
    return [f[VNET_HDR_LEN:] if node.vnet else f for f in frames]


def test_first_packet_handshakes_then_flows(pair) -> None:
    a, b = pair
    pkts = [udp_packet("198.19.1.1", "198.19.2.1", n) for n in (10, 500, 1300)]
    for p in pkts:
        a.inject(p)
    pump([a, b])
    assert strip(b, b.written()) == pkts
    assert a.engine.counters.handshakes == 1 and b.engine.counters.handshakes == 1
    reply = udp_packet("198.19.2.1", "198.19.1.1", 77)
    b.inject(reply)
    pump([a, b])
    assert strip(a, a.written()) == [reply]
    st = b.engine.stats(0.0)
    assert st["rx_packets"] == 3 and st["peers"][0]["endpoint"].startswith(f"{ADDR}:")


def test_unknown_destination_and_spoofed_source_dropped(pair) -> None:
    a, b = pair
    a.inject(udp_packet("198.19.1.1", "198.19.9.1", 20))  # no peer covers 198.19.9.0
    a.inject(udp_packet("198.19.7.7", "198.19.2.1", 20))  # B does not allow this source from A
    a.inject(udp_packet("198.19.1.1", "198.19.2.1", 20))
    pump([a, b])
    assert len(b.written()) == 1
    assert a.engine.counters.drops["unknown_peer"] == 1
    assert b.engine.stats(0.0)["drop_not_allowed_ip"] == 1


def tcp_superpacket(n_segments: int, mss: int = 1000) -> tuple[bytes, VnetHdr, bytes]:
    """Build MSS-sized segments with scapy, coalesce them (packet/gro) into what a TSO TUN read returns."""
    payload = os.urandom(n_segments * mss)
    segs = [
        bytes(
            IP(src="198.19.1.1", dst="198.19.2.1", id=100 + i, flags="DF")
            / TCP(sport=5000, dport=80, seq=1000 + i * mss, ack=1, flags="A", window=1000)
            / Raw(payload[i * mss : (i + 1) * mss])
        )
        for i in range(n_segments)
    ]
    writes = coalesce(PacketBatch.from_packets(segs, headroom=VNET_HDR_LEN), vnet=True, gro=True)
    assert len(writes) == 1
    frame = b"".join(bytes(x) for x in writes[0])
    return frame[VNET_HDR_LEN:], VnetHdr.decode(frame[:VNET_HDR_LEN]), payload


def handshaken_vnet_pair() -> tuple[Node, Node]:
    """Two vnet nodes that know each other and have finished a handshake (first packet: 8 bytes of UDP)."""
    a, b = Node(1, True), Node(2, True)
    try:
        for x, y in ((a, b), (b, a)):
            cfg = WgPeerConfig(y.public_key, (ADDR, y.udp.address[1]), (y.subnet,))
            x.engine.set_peers([cfg], time.monotonic())
        a.inject(udp_packet("198.19.1.1", "198.19.2.1", 8))
        pump([a, b])
        b.written()
    except BaseException:
        a.close()
        b.close()
        raise
    return a, b


def test_superpacket_split_sealed_and_coalesced_again() -> None:
    a, b = handshaken_vnet_pair()
    try:
        raw, hdr, payload = tcp_superpacket(20)
        assert hdr.gso_type != 0
        calls = a.engine.counters.tx_send_calls
        a.inject(raw, hdr)
        pump([a, b])
        assert a.engine.counters.tx_send_calls - calls <= 2  # one UDP_SEGMENT sendmsg (or a fallback pair)
        frames = b.written()
        got = b""
        for f in frames:
            vh = VnetHdr.decode(f[:VNET_HDR_LEN])
            pkt = f[VNET_HDR_LEN:]
            ihl = (pkt[0] & 15) * 4
            doff = (pkt[ihl + 12] >> 4) * 4
            got += pkt[ihl + doff :]
            assert vh.gso_type in (0, hdr.gso_type)
        assert got == payload
        assert len(frames) < 20  # coalesced on the way into B's TUN
    finally:
        a.close()
        b.close()


def test_trains_received_together_are_coalesced_together() -> None:
    """Three superpackets sealed as three UDP_GRO trains, taken by one recvmmsg: gro_trains writes each
    back as the superpacket it was."""
    a, b = handshaken_vnet_pair()
    try:
        sent = [tcp_superpacket(12) for _ in range(3)]
        for raw, hdr, _ in sent:
            a.inject(raw, hdr)
        merged = []
        merge = b.engine._merge_trains
        b.engine._merge_trains = lambda trains: merged.append(merge(trains)) or merged[-1]  # type: ignore[method-assign]
        a.engine.tx_once(time.monotonic())  # loopback: the trains wait in B's socket before B looks
        assert b.engine.rx_once(time.monotonic()) == 3 * 12
        assert len(merged) == 1 and merged[0] is not None and merged[0].ok.all()
        assert b.written() == [hdr.encode() + raw for raw, hdr, _ in sent]
        assert b.engine.counters.rx_packets >= 3 * 12
    finally:
        a.close()
        b.close()


def test_superpackets_sent_as_two_messages_each_are_received_whole() -> None:
    """Two 64 KiB superpackets of full-size segments: each goes out as two UDP_SEGMENT messages (45
    datagrams, the most one message carries, and 2) of one sendmmsg; one recvmmsg takes all four, each
    rest is moved behind its first part, and gro_trains checks the two trains (every other slot)
    together."""
    a, b = handshaken_vnet_pair()
    try:
        sent = [tcp_superpacket(47, mss=MTU - 40) for _ in range(2)]
        merged = []
        merge = b.engine._merge_trains
        b.engine._merge_trains = lambda trains: merged.append(merge(trains)) or merged[-1]  # type: ignore[method-assign]
        calls = a.engine.counters.tx_send_calls
        for raw, hdr, _ in sent:  # one at a time: the fake TUN's socket holds one 64 KiB packet
            a.inject(raw, hdr)
            a.engine.tx_once(time.monotonic())
        assert a.engine.counters.tx_send_calls - calls == 2
        assert b.engine.rx_once(time.monotonic()) == 2 * 47
        assert b.engine.counters.joined_runs == 2
        assert len(merged) == 1 and merged[0] is not None and merged[0].ok.tolist() == [True, True]
        assert b.written() == [hdr.encode() + raw for raw, hdr, _ in sent]
    finally:
        a.close()
        b.close()


def test_peer_reconfiguration_keeps_session(pair) -> None:
    a, b = pair
    a.inject(udp_packet("198.19.1.1", "198.19.2.1", 8))
    pump([a, b])
    kp = a.device.peers[b.public_key].current
    cfg = WgPeerConfig(b.public_key, (ADDR, b.udp.address[1]), (b.subnet, "198.19.22.0/24"))
    a.engine.set_peers([cfg], time.monotonic())
    assert a.device.peers[b.public_key].current is kp
    a.inject(udp_packet("198.19.1.1", "198.19.22.5", 8))
    pump([a, b])
    assert len(b.written()) == 2
    a.engine.set_peers([], time.monotonic())
    assert a.device.peers == {} and a.device.index_table == {}


def test_many_packets_take_the_array_path_in_order(pair) -> None:
    # More than FEW packets in one TUN batch: routed and sealed as arrays (unknown destinations dropped
    # from the middle of the batch), opened on the other side, delivered in order.
    from udpflannel.dataplane.wg_engine import FEW

    a, b = pair
    a.inject(udp_packet("198.19.1.1", "198.19.2.1", 8))  # handshake first
    pump([a, b])
    b.written()
    pkts = [udp_packet("198.19.1.1", "198.19.2.1", 40 + 30 * i) for i in range(FEW + 4)]
    for i, p in enumerate(pkts):
        a.inject(p)
        if i == 2:
            a.inject(udp_packet("198.19.1.1", "198.19.9.9", 20))  # no peer
    pump([a, b])
    assert strip(b, b.written()) == pkts
    assert a.engine.counters.drops["unknown_peer"] == 1
    assert b.engine.counters.rx_packets == len(pkts) + 1


def spy_on(monkeypatch, name: str, take: bool) -> list[bool]:
    """wg_rx.<name> (udp_run or ack_run) replaced by one that declines every train unless `take` (the
    general coalesce then writes it); returns the list of, per call, whether it took the train."""
    made: list[bool] = []
    real = getattr(wg_rx, name)

    def spy(batch: PacketBatch):
        out = real(batch) if take else None
        made.append(out is not None)
        return out

    monkeypatch.setattr(wg_rx, name, spy)
    return made


@pytest.mark.parametrize("run_path", [True, False], ids=["udp_run", "coalesce"])
def test_a_udp_flow_arrives_as_one_uso_write(monkeypatch, run_path: bool) -> None:
    """Equal datagrams of one UDP flow, sealed as one train: with a TUN that takes USO, the receiver writes
    them as one UDP_L4 superpacket (udp_run, or the general coalesce: the same bytes) that splits back into
    exactly the datagrams sent."""
    made = spy_on(monkeypatch, "udp_run", run_path)
    a, b = handshaken_vnet_pair()
    try:
        b.tun.offload_flags |= linux.TUN_F_USO4 | linux.TUN_F_USO6
        pkts = [udp_packet("198.19.1.1", "198.19.2.1", 64) for _ in range(30)]
        for p in pkts:
            a.inject(p)
        pump([a, b])
        writes = b.written()
        assert len(writes) == 1
        vh = VnetHdr.decode(writes[0][:VNET_HDR_LEN])
        assert vh.gso_type == VIRTIO_NET_HDR_GSO_UDP_L4
        split = reference.split(writes[0][VNET_HDR_LEN:], vh)

        def but_id(pkt: bytes) -> bytes:  # the kernel numbers a split's IPv4 ids (and so their checksums)
            return pkt[:4] + pkt[6:10] + pkt[12:]

        assert [but_id(s) for s in split] == [but_id(p) for p in pkts]
        assert b.engine.counters.rx_packets == 31
        assert made == [run_path]  # one train, merged by udp_run or left to coalesce
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("run_path", [True, False], ids=["ack_run", "coalesce"])
def test_a_train_of_acks_arrives_as_a_write_each(monkeypatch, run_path: bool) -> None:
    """A flow's pure ACKs, sealed as one train: the receiver writes each on its own with a zero virtio
    header (ack_run, or the general coalesce: the same bytes), exactly as sent."""
    made = spy_on(monkeypatch, "ack_run", run_path)
    a, b = handshaken_vnet_pair()
    try:
        pkts = [
            bytes(IP(src="198.19.1.1", dst="198.19.2.1", id=i) / TCP(sport=5201, dport=4000, ack=1000 * i))
            for i in range(20)
        ]
        for p in pkts:
            a.inject(p)
        pump([a, b])
        assert b.written() == [bytes(VNET_HDR_LEN) + p for p in pkts]
        assert b.engine.counters.rx_packets == 21
        assert made == [run_path]  # one train, written by ack_run or left to coalesce
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("shape", ["alike", "mixed"])
def test_a_run_of_superpackets_is_split_together_in_order(monkeypatch, shape: str) -> None:
    """A TUN read of three superpackets, a plain packet and two more: the three alike are split together
    (gso_many), each sealed as its own batch; runs that are too short or of mixed segment sizes are split
    one by one. The peer writes back every superpacket and the plain packet, in the order read."""
    runs: list[int] = []  # superpackets per split_many call that did the split
    real = wg_engine.split_many

    def spy(batch, headers, rows, headroom):
        many = real(batch, headers, rows, headroom)
        if many is not None:
            runs.append(len(many))
        return many

    monkeypatch.setattr(wg_engine, "split_many", spy)
    a, b = handshaken_vnet_pair()
    try:
        mss = [1000, 1000, 1000] if shape == "alike" else [1000, 900, 1000]
        first = [tcp_superpacket(6, mss=m) for m in mss]
        plain = udp_packet("198.19.1.1", "198.19.2.1", 100)
        last = [tcp_superpacket(5) for _ in range(2)]
        for raw, hdr, _ in first:
            a.inject(raw, hdr)
        a.inject(plain)
        for raw, hdr, _ in last:
            a.inject(raw, hdr)
        a.engine.tx_once(time.monotonic())  # one read of all six
        pump([a, b])
        want = [hdr.encode() + raw for raw, hdr, _ in first] + [bytes(VNET_HDR_LEN) + plain]
        want += [hdr.encode() + raw for raw, hdr, _ in last]
        assert b.written() == want
        assert runs == ([3] if shape == "alike" else [])
    finally:
        a.close()
        b.close()
