"""dataplane/rowpath.py: the per-row paths for a few small packets give the same TUN writes, datagrams and
counters as the batch pipelines, and step aside (doing nothing) for anything the pipelines must judge."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import OUR_MAC, PEER_MAC, FakeTun, Harness, _engine

from udpflannel.codec import vxlan
from udpflannel.dataplane import engine as engine_mod
from udpflannel.dataplane import rowpath
from udpflannel.dataplane.counters import INDEX
from udpflannel.dataplane.engine import HEADROOM
from udpflannel.io.linux import ACK_FILTER_ENV
from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_UDP_L4, VNET_HDR_DTYPE, VnetHdr

scapy = pytest.importorskip("scapy.all")

COUNTED = ("rx_packets", "rx_bytes", "rx_coalesced_writes", "tx_packets", "tx_bytes")


def _frame(inner: bytes) -> bytes:
    return vxlan.encode_vxlan(inner, 1, vxlan.parse_mac(PEER_MAC), vxlan.parse_mac(OUR_MAC))


def _small(outbound: bool = False) -> list[bytes]:
    """Four small packets of three kinds, from the peer's subnets to ours (or the other way round)."""
    a4, b4, a6, b6 = "198.19.2.5", "198.19.1.1", "fd00:198:19:2::7", "fd00:198:19:1::1"
    if outbound:
        a4, b4, a6, b6 = b4, a4, b6, a6
    six = bytes(scapy.IPv6(src=a6, dst=b6) / scapy.UDP(sport=5, dport=6))
    tcp = bytes(scapy.IP(src=a4, dst=b4) / scapy.TCP(flags="A", sport=1, dport=2))
    udp = [bytes(scapy.IP(src=a4, dst=b4) / scapy.UDP(sport=7, dport=9) / bytes(n)) for n in (10, 200)]
    return [udp[0], six, tcp, udp[1]]


def _run(datagrams, monkeypatch, *, per_row: bool, encap: str = "vxlan", outbound: list[bytes] | None = None):
    if not per_row:  # the batch pipeline for every size
        monkeypatch.setattr(engine_mod, "FEW_PACKETS", 0)
        monkeypatch.setattr(engine_mod, "FEW_SMALL_PACKETS", 0)
    tun_packets = _small(outbound=True) if outbound is None else outbound
    eng, c = _engine(encap, datagrams=datagrams, tun_packets=tun_packets)
    eng.engine.rx_once()
    eng.engine.tx_once()
    monkeypatch.undo()
    return eng, c


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
def test_few_frames_per_row_match_the_batch_pipeline(monkeypatch, encap):
    # udp: flannel's udp format is the bare inner packet; its TTL goes down by one on the way out
    datagrams = [(_frame(p) if encap == "vxlan" else p, "198.18.0.2") for p in _small()]
    row, c_row = _run(datagrams, monkeypatch, per_row=True, encap=encap)
    batch, c_batch = _run(datagrams, monkeypatch, per_row=False, encap=encap)
    assert row.tun.written == batch.tun.written == _small()
    assert sorted(row.sent) == sorted(batch.sent) and len(row.sent) == 4
    for name in COUNTED:
        assert c_row[INDEX[name]] == c_batch[INDEX[name]], name
    if encap == "udp":
        ttls = [scapy.IP(d).ttl if d[0] >> 4 == 4 else scapy.IPv6(d).hlim for d, _, _ in row.sent]
        assert ttls == [63] * 4
        for d, _, _ in row.sent:
            if d[0] >> 4 == 4:
                fixed = scapy.IP(d)
                del fixed.chksum
                assert bytes(scapy.IP(bytes(fixed)))[:20] == d[:20]  # the incremental checksum is right


def test_udp_ttl_one_is_answered_by_the_pipeline(monkeypatch):
    expiring = [bytes(scapy.IP(src="198.19.1.1", dst="198.19.2.5", ttl=1) / scapy.UDP(sport=7, dport=9))]
    eng, c = _run([], monkeypatch, per_row=True, encap="udp", outbound=_small(outbound=True)[:1] + expiring)
    assert c[INDEX["drop_ttl_exceeded"]] == 1 and len(eng.sent) == 1
    assert scapy.IP(eng.tun.written[-1]).getlayer(scapy.ICMP).type == 11  # time exceeded, as a router does


@pytest.mark.parametrize(
    "bad",
    [
        lambda f: f[:6] + b"\x02" + f[7:],  # another VNI
        lambda f: f[:-1] + bytes([f[-1] ^ 1]),  # a payload byte flipped: the L4 checksum fails
        lambda f: f[:30],  # truncated inner packet
    ],
    ids=["vni", "l4-checksum", "truncated"],
)
def test_one_bad_frame_sends_the_batch_to_the_pipeline(monkeypatch, bad):
    frames = [_frame(p) for p in _small()]
    frames[1] = bad(frames[1])
    eng, c = _run([(f, "198.18.0.2") for f in frames], monkeypatch, per_row=True)
    good = [p for i, p in enumerate(_small()) if i != 1]
    assert eng.tun.written == good
    assert c[INDEX["rx_packets"]] == 3
    assert int(np.sum(c[[v for k, v in INDEX.items() if k.startswith("drop_")]])) == 1


def test_stranger_source_is_judged_by_the_pipeline(monkeypatch):
    datagrams = [(_frame(p), "198.18.0.2") for p in _small()]
    datagrams[2] = (datagrams[2][0], "198.18.0.77")
    eng, c = _run(datagrams, monkeypatch, per_row=True)
    assert c[INDEX["drop_not_a_peer_source"]] == 1
    assert len(eng.tun.written) == 3


def _receive_one(datagram: bytes, source: str, encap: str, *, lone: bool, vnet: bool):
    """One datagram as the one of its receive: through receive_lone (lone) or the batch paths."""
    eng, c = _engine(encap, datagrams=[(datagram, source)])
    eng.engine.tun = eng.tun = VnetTun([]) if vnet else eng.tun
    real = eng.engine.receive_lone
    eng.engine.receive_lone = real if lone else (lambda *_: False)
    eng.engine.rx_once()
    return eng.tun.written, c


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
@pytest.mark.parametrize("vnet", [True, False], ids=["vnet", "plain"])
@pytest.mark.parametrize("kind", range(4), ids=["udp", "v6", "tcp", "udp-200"])
def test_a_lone_datagram_is_written_as_the_batch_paths_write_it(encap, vnet, kind):
    inner = _small()[kind]
    datagram = _frame(inner) if encap == "vxlan" else inner
    fast, c_fast = _receive_one(datagram, "198.18.0.2", encap, lone=True, vnet=vnet)
    slow, c_slow = _receive_one(datagram, "198.18.0.2", encap, lone=False, vnet=vnet)
    assert fast == slow and len(fast) == 1
    assert fast[0][10 if vnet else 0 :] == inner and (not vnet or fast[0][:10] == bytes(10))
    assert np.array_equal(c_fast, c_slow)


@pytest.mark.parametrize(
    "bad",
    [
        lambda f: f[:6] + b"\x02" + f[7:],  # another VNI
        lambda f: f[:-1] + bytes([f[-1] ^ 1]),  # a payload byte flipped: the L4 checksum fails
        lambda f: f[:30],  # truncated inner packet
        lambda f: f[:20],  # shorter than the VXLAN and inner Ethernet headers
        "stranger",
    ],
    ids=["vni", "l4-checksum", "truncated", "short", "stranger"],
)
def test_a_lone_datagram_that_needs_judging_is_judged_by_the_batch_paths(bad):
    datagram, source = _frame(_small()[0]), "198.18.0.2"
    if bad == "stranger":
        source = "198.18.0.77"
    else:
        datagram = bad(datagram)
    fast, c_fast = _receive_one(datagram, source, "vxlan", lone=True, vnet=True)
    slow, c_slow = _receive_one(datagram, source, "vxlan", lone=False, vnet=True)
    assert fast == slow == []
    assert np.array_equal(c_fast, c_slow)
    assert int(np.sum(c_fast[[v for k, v in INDEX.items() if k.startswith("drop_")]])) == 1


class UsoTun(FakeTun):
    """A TUN with virtio headers that takes USO superpackets (Linux 6.2+)."""

    vnet = True
    uso = True


def _udp_train(encap: str, count: int = 30) -> list[bytes]:
    pkts = [
        bytes(scapy.IP(src="198.19.2.5", dst="198.19.1.1", id=i) / scapy.UDP(sport=7, dport=9) / bytes(64))
        for i in range(count)
    ]
    return [_frame(p) if encap == "vxlan" else p for p in pkts]


def _receive(monkeypatch, datagrams, encap: str, *, run_path: bool):
    if not run_path:  # the general pipeline (validate_ip, then coalesce with USO)
        monkeypatch.setattr(rowpath, "udp_run", lambda batch, prefix: None)
    h = Harness(encap, datagrams=datagrams)
    h.engine.tun = h.tun = UsoTun([])
    h.engine._uso = True
    h.engine.rx_once()
    monkeypatch.undo()
    return h.tun.written, h.counters


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
def test_a_udp_train_is_one_uso_write_as_the_pipeline_makes_it(monkeypatch, encap):
    datagrams = [(f, "198.18.0.2") for f in _udp_train(encap)]
    fast, c_fast = _receive(monkeypatch, datagrams, encap, run_path=True)
    slow, c_slow = _receive(monkeypatch, datagrams, encap, run_path=False)
    assert len(fast) == 1 and fast == slow
    vh = VnetHdr.decode(fast[0][:10])
    assert (vh.gso_type, vh.gso_size) == (VIRTIO_NET_HDR_GSO_UDP_L4, 64)
    for name in COUNTED:
        assert c_fast[INDEX[name]] == c_slow[INDEX[name]], name
    assert c_fast[INDEX["rx_packets"]] == 30


def test_a_udp_train_with_a_stranger_is_judged_by_the_pipeline(monkeypatch):
    datagrams = [(f, "198.18.0.2") for f in _udp_train("vxlan")]
    datagrams[7] = (datagrams[7][0], "198.18.0.77")
    written, c = _receive(monkeypatch, datagrams, "vxlan", run_path=True)
    assert len(written) == 1  # the 29 others, still one USO write
    assert c[INDEX["drop_not_a_peer_source"]] == 1
    assert c[INDEX["rx_packets"]] == 29


def _flood(count: int, kind: str) -> tuple[list[bytes], list[tuple[int, ...]]]:
    """One flow's packets from our pod to the peer's as the TUN hands them over: NEEDS_CSUM, the checksum
    field holding the pseudo-header sum (kind "plain": checksums done, no flag)."""
    pkts, headers = [], []
    for i in range(count):
        size = 64 if kind != "mixed" else 30 + 7 * i  # odd lengths too
        l4 = scapy.TCP(sport=7, dport=9, flags="A", seq=i) if kind == "tcp" else scapy.UDP(sport=7, dport=9)
        raw = bytearray(bytes(scapy.IP(src="198.19.1.1", dst="198.19.2.5", id=i) / l4 / bytes(size)))
        at = 20 + (16 if kind == "tcp" else 6)
        if kind != "plain":
            raw[at : at + 2] = reference.pseudo_header(bytes(raw), raw[9], len(raw) - 20).to_bytes(2, "big")
        pkts.append(bytes(raw))
        headers.append((1, 0, 0, 0, 20, at - 20) if kind != "plain" else (0, 0, 0, 0, 0, 0))
    return pkts, headers


def _send(monkeypatch, pkts, headers, encap: str, *, run_path: bool):
    h = Harness(encap)
    taken = []
    real = h.engine.send_run
    h.engine.send_run = lambda batch, hdr: taken.append(real(batch, hdr) if run_path else False) or taken[-1]
    batch = PacketBatch.from_packets(pkts, headroom=HEADROOM)
    vh = np.array(headers, VNET_HDR_DTYPE)
    h.engine.process_tx(batch, vh, None)
    return h.sent, h.counters, taken


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
@pytest.mark.parametrize("kind", ["udp", "mixed", "tcp", "plain"])
@pytest.mark.parametrize("count", [40, 10], ids=["flood", "acks"])  # 10: what the per-row path also takes
def test_a_batch_of_one_flow_leaves_as_the_general_path_sends_it(monkeypatch, encap, kind, count):
    pkts, headers = _flood(count, kind)
    fast, c_fast, taken = _send(monkeypatch, pkts, headers, encap, run_path=True)
    slow, c_slow, _ = _send(monkeypatch, pkts, headers, encap, run_path=False)
    assert taken == [True] and fast == slow and len(fast) == count
    for name in (*COUNTED, "tx_send_calls"):
        assert c_fast[INDEX[name]] == c_slow[INDEX[name]], name
    inner = (
        vxlan.decode_vxlan(fast[3][0], 1, vxlan.parse_mac(PEER_MAC)).inner if encap == "vxlan" else fast[3][0]
    )
    clean = scapy.IP(inner)
    layer = clean[scapy.TCP] if kind == "tcp" else clean[scapy.UDP]
    del layer.chksum
    assert bytes(scapy.IP(bytes(clean)))[20:] == inner[20:]  # the finished checksum is right


@pytest.mark.parametrize("flaw", ["two-flows", "over-mtu", "ttl-one", "bad-offset"])
def test_a_batch_that_needs_judging_takes_the_general_path(monkeypatch, flaw):
    pkts, headers = _flood(40, "udp")
    if flaw == "two-flows":
        pkts[5] = pkts[5][:20] + b"\x00\x08" + pkts[5][22:]  # another source port
    elif flaw == "over-mtu":
        pkts[5] = bytes(
            scapy.IP(src="198.19.1.1", dst="198.19.2.5", flags="DF")
            / scapy.UDP(sport=7, dport=9)
            / bytes(1500)
        )
    elif flaw == "ttl-one":
        pkts[5] = bytes(
            scapy.IP(src="198.19.1.1", dst="198.19.2.5", ttl=1) / scapy.UDP(sport=7, dport=9) / bytes(64)
        )
    elif flaw == "bad-offset":
        headers = [(1, 0, 0, 0, 20, 200)] * 40  # past every packet's end
    encap = "udp" if flaw == "ttl-one" else "vxlan"
    fast, c_fast, taken = _send(monkeypatch, pkts, headers, encap, run_path=True)
    slow, c_slow, _ = _send(monkeypatch, pkts, headers, encap, run_path=False)
    assert taken == [False] and fast == slow
    assert np.array_equal(c_fast, c_slow)


def _lone(kind: str) -> tuple[bytes, tuple[int, ...]]:
    """One packet from our pod to the peer's, as the TUN hands it over (NEEDS_CSUM where it may be)."""
    if kind == "icmp":
        return bytes(scapy.IP(src="198.19.1.1", dst="198.19.2.5") / scapy.ICMP(seq=3) / bytes(56)), (0,) * 6
    if kind == "v6":
        pkt = scapy.IPv6(src="fd00:198:19:1::1", dst="fd00:198:19:2::5") / scapy.UDP(sport=7, dport=9)
        raw = bytearray(bytes(pkt / bytes(33)))
        raw[46:48] = reference.pseudo_header(bytes(raw), 17, len(raw) - 40).to_bytes(2, "big")
        return bytes(raw), (1, 0, 0, 0, 40, 6)
    pkts, headers = _flood(1, kind)
    return pkts[0], headers[0]


def _send_lone(pkt: bytes, header: tuple[int, ...], encap: str, *, lone: bool):
    """The packet as a one-row TUN read, through send_lone (lone) or the batch paths; what was sent and
    counted, and send_lone's answer."""
    h = Harness(encap)
    batch = PacketBatch.from_packets([pkt.ljust(64, b"\0")], headroom=HEADROOM)  # as wide as hashes read
    batch.lengths[0] = len(pkt)
    batch.buf[0, HEADROOM - 10 : HEADROOM] = np.frombuffer(VnetHdr(*header).encode(), np.uint8)
    before = batch.buf.copy()
    took = h.engine.send_lone(batch.buf[0].data, HEADROOM, len(pkt), True) if lone else False
    if not took:
        assert np.array_equal(batch.buf, before), "send_lone refused but changed the packet"
        h.engine.process_tx(batch, np.array([header], VNET_HDR_DTYPE), None)
    return h.sent, h.counters, took


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
@pytest.mark.parametrize("kind", ["tcp", "udp", "plain", "icmp", "v6"])
def test_a_lone_packet_leaves_as_the_batch_paths_send_it(encap, kind):
    pkt, header = _lone(kind)
    fast, c_fast, took = _send_lone(pkt, header, encap, lone=True)
    slow, c_slow, _ = _send_lone(pkt, header, encap, lone=False)
    assert took and fast == slow and len(fast) == 1
    for name in (*COUNTED, "tx_send_calls"):
        assert c_fast[INDEX[name]] == c_slow[INDEX[name]], name


@pytest.mark.parametrize("flaw", ["gso", "over-mtu", "ttl-one", "bad-offset", "no-peer", "short"])
def test_a_lone_packet_that_needs_judging_takes_the_batch_paths(flaw):
    pkt, header = _lone("udp")
    encap = "udp" if flaw == "ttl-one" else "vxlan"
    if flaw == "gso":
        header = (1, VIRTIO_NET_HDR_GSO_UDP_L4, 28, 40, 20, 6)
    elif flaw == "over-mtu":
        pkt = bytes(scapy.IP(src="198.19.1.1", dst="198.19.2.5", flags="DF") / scapy.UDP() / bytes(1500))
        header = (0,) * 6
    elif flaw == "ttl-one":
        pkt = bytes(scapy.IP(src="198.19.1.1", dst="198.19.2.5", ttl=1) / scapy.UDP() / bytes(64))
        header = (0,) * 6
    elif flaw == "bad-offset":
        header = (1, 0, 0, 0, 20, 200)  # past the packet's end: a bad_header drop
    elif flaw == "no-peer":
        pkt = bytes(scapy.IP(src="198.19.1.1", dst="198.19.9.5") / scapy.UDP() / bytes(64))
        header = (0,) * 6
    elif flaw == "short":
        pkt = bytes(scapy.IP(src="198.19.1.1", dst="198.19.2.5") / scapy.UDP())[:24]
        header = (0,) * 6
    fast, c_fast, took = _send_lone(pkt, header, encap, lone=True)
    slow, c_slow, _ = _send_lone(pkt, header, encap, lone=False)
    assert not took and fast == slow
    assert np.array_equal(c_fast, c_slow)


class VnetTun(FakeTun):
    """A TUN with virtio headers (no USO)."""

    vnet = True


def _acks(count: int) -> list[bytes]:
    """One flow's pure ACKs from the peer's pod to ours, as its kernel sends them back to a sender."""
    return [
        bytes(
            scapy.IP(src="198.19.2.5", dst="198.19.1.1", id=i, flags="DF")
            / scapy.TCP(sport=5201, dport=40000, flags="A", seq=1, ack=1000 + 60000 * i, window=500 + i)
        )
        for i in range(count)
    ]


def _receive_acks(monkeypatch, datagrams, encap: str, *, run_path: bool, ack_filter: bool = False):
    monkeypatch.setattr(engine_mod, "FEW_SMALL_PACKETS", 0)  # the train, not the per-row path
    if (
        not ack_filter
    ):  # every ACK written, as the general pipeline writes them (tests/dataplane/test_engine_acks.py)
        monkeypatch.setenv(ACK_FILTER_ENV, "0")
    if not run_path:  # the general pipeline (validate_ip, then coalesce)
        monkeypatch.setattr(rowpath, "ack_run", lambda batch, prefix: None)
    h = Harness(encap, datagrams=datagrams)
    h.engine.tun = h.tun = VnetTun([])
    h.engine.rx_once()
    monkeypatch.undo()
    return h.tun.written, h.counters


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
def test_a_train_of_acks_is_written_as_the_pipeline_writes_it(monkeypatch, encap):
    datagrams = [(_frame(p) if encap == "vxlan" else p, "198.18.0.2") for p in _acks(21)]
    fast, c_fast = _receive_acks(monkeypatch, datagrams, encap, run_path=True)
    slow, c_slow = _receive_acks(monkeypatch, datagrams, encap, run_path=False)
    assert fast == slow == [bytes(10) + p for p in _acks(21)]  # a write each, zero virtio header
    for name in COUNTED:
        assert c_fast[INDEX[name]] == c_slow[INDEX[name]], name
    assert c_fast[INDEX["rx_packets"]] == 21


def test_a_train_of_acks_with_a_bad_one_is_judged_by_the_pipeline(monkeypatch):
    frames = [_frame(p) for p in _acks(21)]
    frames[5] = frames[5][:-1] + bytes([frames[5][-1] ^ 1])  # the TCP checksum fails
    written, c = _receive_acks(monkeypatch, [(f, "198.18.0.2") for f in frames], "vxlan", run_path=True)
    assert len(written) == 20 and c[INDEX["drop_bad_l4_checksum"]] == 1


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
def test_of_a_train_of_acks_the_last_is_written_when_filtering(monkeypatch, encap):
    datagrams = [(_frame(p) if encap == "vxlan" else p, "198.18.0.2") for p in _acks(21)]
    written, c = _receive_acks(monkeypatch, datagrams, encap, run_path=True, ack_filter=True)
    assert written == [bytes(10) + _acks(21)[-1]]
    assert (c[INDEX["rx_acks_filtered"]], c[INDEX["rx_packets"]], c[INDEX["rx_coalesced_writes"]]) == (
        20,
        1,
        1,
    )
    assert c[INDEX["rx_bytes"]] == len(_acks(21)[-1])
