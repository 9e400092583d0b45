"""dataplane/engine.py driven without sockets: fake TUN and UDP objects, scapy-built packets."""

from __future__ import annotations

import ipaddress
import socket

import numpy as np
import pytest

from udpflannel.codec import vxlan
from udpflannel.dataplane.counters import INDEX, SLOTS
from udpflannel.dataplane.engine import HEADROOM, Engine, EngineConfig
from udpflannel.dataplane.peers import Peer
from udpflannel.dataplane.txprep import flow_hash
from udpflannel.io.tun import TunRead
from udpflannel.io.udp import LoneDatagram, Received, UdpStats
from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.vnet import VNET_HDR_DTYPE, VnetHdr

scapy = pytest.importorskip("scapy.all")

OUR_MAC = "02:00:00:00:00:01"
PEER_MAC = "02:00:00:00:00:02"


class FakeTun:
    """io.tun.Tun in plain mode (no virtio header): packets in, written packets recorded."""

    vnet = False

    def __init__(self, packets: list[bytes]) -> None:
        self.inbox = list(packets)
        self.written: list[bytes] = []

    def read_batch(self, max_packets: int, headroom: int, arena=None) -> TunRead:
        take, self.inbox = self.inbox[:max_packets], self.inbox[max_packets:]
        batch = PacketBatch.from_packets(take, headroom=headroom)
        return TunRead(batch, np.zeros(batch.n, VNET_HDR_DTYPE))

    def write_plain(self, packet) -> bool:
        self.written.append(bytes(packet))
        return True

    def write_batch(self, writes) -> int:
        for iov in writes:
            self.written.append(b"".join(bytes(x) for x in iov))
        return len(writes)


class FakeRx:
    """io.udp.UdpSocket receive side: datagrams with their IPv4 sources."""

    def __init__(self, datagrams) -> None:
        self.inbox = list(datagrams)
        self.stats = UdpStats()

    def recv_trains(self, max_messages=None, *, sets: bool = False, lone: bool = False) -> list:
        rec = self.recv_batch(max_messages)
        if lone and rec.batch.n == 1:  # as UdpSocket does: the datagram where it lies, its source as bytes
            row = rec.batch.buf[0, rec.batch.offset :].data
            return [LoneDatagram(row, int(rec.batch.lengths[0]), rec.src_addr[0].tobytes(), lambda: rec)]
        return [rec] if rec.batch.n else []

    def recv_batch(self, max_messages=None) -> Received:
        take, self.inbox = self.inbox[:64], self.inbox[64:]
        batch = PacketBatch.from_packets([d for d, _ in take], headroom=HEADROOM)
        src = np.array([list(ipaddress.IPv4Address(a).packed) for _, a in take], np.uint8).reshape(-1, 4)
        return Received(batch, src, np.zeros((len(take), 16), np.uint8), socket.AF_INET)


class FakeSock:
    """io.udp.UdpSocket send side: records (datagram, destination, socket) and keeps its stats."""

    def __init__(self, index: int, log: list) -> None:
        self.index = index
        self.log = log
        self.stats = UdpStats()
        self.gso = index % 2 == 0  # half the pool with GSO: both send paths run

    def send_segments(self, rows, seg_size, dest) -> int:
        for r in rows:
            self.log.append((bytes(r), dest, self.index))
        self.stats.sent += len(rows)
        self.stats.send_calls += 1
        return len(rows)

    def send_spans(self, data, spans, seg_size, dest) -> int:
        sent = sum(self.send_packed(data[a : a + n], seg_size, dest) for a, n in spans)
        self.stats.send_calls -= len(spans) - 1  # one sendmmsg for them all
        return sent

    def send_packed(self, data, seg_size, dest) -> int:
        mv = memoryview(data)
        rows = [mv[a : a + seg_size] for a in range(0, len(mv), seg_size)]
        return self.send_segments(rows, seg_size, dest)

    def send_rows(self, buf, rows, col, lengths, dest) -> int:
        items = [
            (buf[r, col : col + ln].data, dest) for r, ln in zip(rows.tolist(), lengths.tolist(), strict=True)
        ]
        return self.sendmmsg(items)

    def send_rows_gso(self, buf, rows, col, seg, last, dest) -> int:
        lengths = np.full(len(rows), seg)
        lengths[-1] = last
        return self.send_rows(buf, rows, col, lengths, dest)

    def send_one(self, datagram, dest) -> int:
        return self.sendmmsg([(datagram, dest)])

    def sendmmsg(self, items) -> int:
        for r, dest in items:
            self.log.append((bytes(r), dest, self.index))
        self.stats.sent += len(items)
        self.stats.send_calls += 1
        return len(items)


class Harness:
    def __init__(self, encap: str, tun_packets=(), datagrams=(), mtu: int = 1450) -> None:
        cfg = EngineConfig(
            encap=encap,
            mtu=mtu,
            port=8472 if encap == "vxlan" else 8285,
            vtep_mac=OUR_MAC,
            icmp_src_v4="198.19.1.0",
            icmp_src_v6="fd00:198:19:1::",
        )
        self.counters = np.zeros(SLOTS, dtype=np.int64)
        self.sent: list[tuple[bytes, tuple[str, int], int]] = []
        self.tun = FakeTun(list(tun_packets))
        pool = [FakeSock(i, self.sent) for i in range(4)]
        self.engine = Engine(cfg, self.tun, FakeRx(datagrams), pool, self.counters)
        self.engine.set_peers(
            [
                Peer("198.19.2.0/24", "198.18.0.2", PEER_MAC),
                Peer("fd00:198:19:2::/64", "198.18.0.2", PEER_MAC),
            ]
        )


def _engine(encap: str, tun_packets=(), datagrams=(), mtu: int = 1450):
    h = Harness(encap, tun_packets, datagrams, mtu)
    return h, h.counters


def _ip(dst: str = "198.19.2.5", size: int = 100, ttl: int = 64, df: bool = True, sport: int = 1000) -> bytes:
    pkt = scapy.IP(src="198.19.1.0", dst=dst, ttl=ttl, flags="DF" if df else 0) / scapy.UDP(
        sport=sport, dport=9
    )
    return bytes(pkt / bytes(size))


@pytest.mark.parametrize("count", [1, 3, 10, 64], ids=lambda n: f"{n}pkts")
def test_vxlan_tx_encapsulates_to_the_peer(count):
    # Up to FEW_PACKETS rows take the per-row path, more the vectorised one: same bytes either way.
    six = bytes(scapy.IPv6(src="fd00:198:19:1::", dst="fd00:198:19:2::7") / scapy.UDP())
    inner = [six if i % 3 == 2 else _ip(sport=2000 + i) for i in range(count)]
    eng, c = _engine("vxlan", inner)
    assert eng.engine.tx_once() == count
    assert len(eng.sent) == count
    got = []
    for data, dst, _ in eng.sent:  # grouped by source socket, so not in read order
        assert dst == ("198.18.0.2", 8472)
        frame = vxlan.decode_vxlan(data, 1, vxlan.parse_mac(PEER_MAC))
        assert isinstance(frame, vxlan.VxlanFrame)
        assert frame.src_mac == vxlan.parse_mac(OUR_MAC)
        got.append(frame.inner)
    assert sorted(got) == sorted(inner)
    assert c[INDEX["tx_packets"]] == count


def test_unknown_peer_gets_net_unreachable_and_is_counted():
    eng, c = _engine("vxlan", [_ip(dst="198.19.9.9")])
    eng.engine.tx_once()
    assert eng.sent == []
    assert c[INDEX["drop_unknown_peer"]] == 1
    reply = scapy.IP(eng.tun.written[0])
    assert reply.dst == "198.19.1.0" and reply[scapy.ICMP].type == 3 and reply[scapy.ICMP].code == 0


@pytest.mark.parametrize("df", [True, False])
def test_too_big_answers_frag_needed_only_with_df(df):
    eng, c = _engine("vxlan", [_ip(size=1500, df=df)], mtu=1450)
    eng.engine.tx_once()
    assert eng.sent == [] and c[INDEX["drop_over_mtu"]] == 1
    if df:
        icmp = scapy.IP(eng.tun.written[0])[scapy.ICMP]
        assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, 1450)
    else:
        assert eng.tun.written == []


def test_ipv6_too_big_answers_packet_too_big():
    big = bytes(scapy.IPv6(src="fd00:198:19:1::", dst="fd00:198:19:2::7") / scapy.UDP() / bytes(1500))
    eng, _ = _engine("vxlan", [big], mtu=1450)
    eng.engine.tx_once()
    reply = scapy.IPv6(eng.tun.written[0])
    assert reply[scapy.ICMPv6PacketTooBig].mtu == 1450


def test_udp_tx_decrements_ttl_and_expires_at_one():
    eng, c = _engine("udp", [_ip(ttl=64), _ip(ttl=1)])
    eng.engine.tx_once()
    assert len(eng.sent) == 1
    out = scapy.IP(eng.sent[0][0])
    assert out.ttl == 63
    ref = scapy.IP(_ip(ttl=63))
    assert out.chksum == ref.chksum
    assert c[INDEX["drop_ttl_exceeded"]] == 1
    assert scapy.IP(eng.tun.written[0])[scapy.ICMP].type == 11


def test_vxlan_rx_validates_and_delivers():
    good = vxlan.encode_vxlan(_ip(), 1, vxlan.parse_mac(PEER_MAC), vxlan.parse_mac(OUR_MAC))
    wrong_mac = vxlan.encode_vxlan(_ip(), 1, vxlan.parse_mac(PEER_MAC), vxlan.parse_mac(PEER_MAC))
    wrong_vni = vxlan.encode_vxlan(_ip(), 2, vxlan.parse_mac(PEER_MAC), vxlan.parse_mac(OUR_MAC))
    datagrams = [
        (good, "198.18.0.2"),
        (good, "198.18.0.99"),
        (wrong_mac, "198.18.0.2"),
        (wrong_vni, "198.18.0.2"),
        (b"\x08", "198.18.0.2"),
    ]
    eng, c = _engine("vxlan", datagrams=datagrams)
    assert eng.engine.rx_once() == 5
    assert eng.tun.written == [_ip()]
    for name in ("drop_not_a_peer_source", "drop_wrong_dst_mac", "drop_bad_vni", "drop_bad_header"):
        assert c[INDEX[name]] == 1, name
    assert c[INDEX["rx_packets"]] == 1


def test_garbage_never_escapes_the_loop():
    rng = np.random.default_rng(7)
    datagrams = [
        (rng.integers(0, 256, int(rng.integers(0, 1500)), dtype=np.uint8).tobytes(), "198.18.0.2")
        for _ in range(300)
    ]
    tun = [rng.integers(0, 256, int(rng.integers(1, 1500)), dtype=np.uint8).tobytes() for _ in range(300)]
    for encap in ("vxlan", "udp"):
        eng, c = _engine(encap, tun, datagrams)
        while eng.engine.rx_once() or eng.engine.tx_once():
            pass
        assert c[INDEX["drop_internal_error"]] == 0


def test_flow_hash_is_stable_per_flow_and_spreads_flows():
    batch = PacketBatch.from_packets(
        [_ip(sport=p) for p in range(1000, 1064)] + [_ip(sport=1000)], headroom=8
    )
    h = flow_hash(batch.buf, batch.offset, batch.n)
    assert h[0] == h[-1]
    assert len(set((h[:-1] % 16).tolist())) >= 12


def test_tcp_superpacket_is_split_encapsulated_and_sent_in_one_call():
    payload = bytes(range(256)) * 40  # 10240 bytes -> 8 segments of 1410 - 40 and a shorter last one
    inner = scapy.IP(src="198.19.1.0", dst="198.19.2.9") / scapy.TCP(sport=4, dport=5, flags="PA", seq=1000)
    raw = bytearray(bytes(inner / payload))
    mss = 1370
    h = Harness("vxlan")
    batch = PacketBatch.from_packets([bytes(raw)], headroom=HEADROOM)
    headers = np.zeros(1, VNET_HDR_DTYPE)
    headers[0] = (1, 1, 40, mss, 20, 16)  # NEEDS_CSUM, TCPV4
    h.engine.process_tx(batch, headers, lambda i: VnetHdr(*headers[i].tolist()))
    assert h.counters[INDEX["tx_superpackets"]] == 1 and h.counters[INDEX["tx_send_calls"]] == 1
    segs = [vxlan.decode_vxlan(d, 1, vxlan.parse_mac(PEER_MAC)) for d, _, _ in h.sent]
    assert len({s for _, _, s in h.sent}) == 1  # one flow, one outer source port
    data = b""
    for i, f in enumerate(segs):
        pkt = scapy.IP(f.inner)
        assert pkt[scapy.TCP].seq == 1000 + i * mss
        clean = scapy.IP(f.inner)
        del clean.chksum, clean[scapy.TCP].chksum
        assert bytes(scapy.IP(bytes(clean))) == f.inner  # every checksum is right
        data += bytes(pkt[scapy.TCP].payload)
    assert data == payload and len(segs) == -(-len(payload) // mss)


@pytest.mark.parametrize("count", [1, 3, 16, 17], ids=lambda n: f"{n}acks")
def test_partial_checksums_of_a_few_packets_are_finished_and_bad_offsets_dropped(count: int) -> None:
    """ACKs as the TUN hands them over (NEEDS_CSUM: the checksum field holds the pseudo-header sum) leave
    with every checksum right, per row for a few, as a batch for more; a row whose checksum offsets point
    past its end is dropped and counted, and the others still go."""
    acks, headers = [], []
    for i in range(count):
        tcp = scapy.TCP(sport=4, dport=5, flags="A", seq=1000, ack=7 + i) / bytes(i % 3)  # odd lengths too
        raw = bytearray(bytes(scapy.IP(src="198.19.1.0", dst="198.19.2.9") / tcp))
        raw[36:38] = reference.pseudo_header(bytes(raw), 6, len(raw) - 20).to_bytes(2, "big")
        acks.append(bytes(raw))
        headers.append((1, 0, 0, 0, 20, 16) if i != 1 else (1, 0, 0, 0, 20, len(raw)))  # NEEDS_CSUM, GSO_NONE
    h = Harness("vxlan")
    batch = PacketBatch.from_packets(acks, headroom=HEADROOM)
    vh = np.array(headers, VNET_HDR_DTYPE)
    h.engine.process_tx(batch, vh, lambda i: VnetHdr(*vh[i].tolist()))
    bad = 1 if count > 1 else 0
    assert h.counters[INDEX["drop_bad_header"]] == bad and len(h.sent) == count - bad
    for data, dest, _ in h.sent:
        inner = vxlan.decode_vxlan(data, 1, vxlan.parse_mac(PEER_MAC)).inner
        clean = scapy.IP(inner)
        del clean[scapy.TCP].chksum
        assert bytes(scapy.IP(bytes(clean))) == inner and dest == ("198.18.0.2", 8472)


def test_flow_cache_follows_peer_changes():
    inner = (
        scapy.IP(src="198.19.1.0", dst="198.19.2.9") / scapy.TCP(sport=4, dport=5, flags="A") / bytes(4000)
    )
    h = Harness("vxlan")
    headers = np.zeros(1, VNET_HDR_DTYPE)
    headers[0] = (1, 1, 40, 1370, 20, 16)

    def send() -> None:
        batch = PacketBatch.from_packets([bytes(inner)], headroom=HEADROOM)
        h.engine.process_tx(batch, headers, lambda i: VnetHdr(*headers[i].tolist()))

    send()
    assert len(h.sent) == 3 and h.sent[0][1] == ("198.18.0.2", 8472)
    h.engine.set_peers([Peer("198.19.2.0/24", "198.18.0.7", PEER_MAC)])
    send()
    assert h.sent[-1][1] == ("198.18.0.7", 8472)
    h.engine.set_peers([])
    before = len(h.sent)
    send()
    assert len(h.sent) == before and h.counters[INDEX["drop_unknown_peer"]] == 3


def test_multicast_is_not_unicast_and_never_answered():
    mld = bytes(scapy.IPv6(src="::", dst="ff02::16") / scapy.ICMPv6EchoRequest())
    v4 = _ip(dst="224.0.0.22")
    eng, c = _engine("vxlan", [mld, v4])
    eng.engine.tx_once()
    assert eng.sent == [] and eng.tun.written == []
    assert c[INDEX["drop_not_unicast"]] == 2 and c[INDEX["drop_unknown_peer"]] == 0


@pytest.mark.parametrize("ttl", [64, 2, 1])
def test_udp_superpacket_decrements_ttl_or_expires(ttl):
    inner = scapy.IP(src="198.19.1.0", dst="198.19.2.9", ttl=ttl) / scapy.TCP(sport=4, dport=5, flags="A")
    h = Harness("udp")
    headers = np.zeros(1, VNET_HDR_DTYPE)
    headers[0] = (1, 1, 40, 1000, 20, 16)
    batch = PacketBatch.from_packets([bytes(inner / bytes(2500))], headroom=HEADROOM)
    h.engine.process_tx(batch, headers, lambda i: VnetHdr(*headers[i].tolist()))
    if ttl == 1:
        assert h.sent == [] and h.counters[INDEX["drop_ttl_exceeded"]] == 3
        return
    assert len(h.sent) == 3 and {d for _, d, _ in h.sent} == {("198.18.0.2", 8285)}
    for data, _, _ in h.sent:
        pkt = scapy.IP(data)
        assert pkt.ttl == ttl - 1
        clean = scapy.IP(data)
        del clean.chksum, clean[scapy.TCP].chksum
        assert bytes(scapy.IP(bytes(clean))) == data


def test_udp_superpacket_ttl_goes_down_once_on_every_path():
    """Superpackets split together, and one with segments over the MTU (the general path takes it and sends
    the short last segment): the TTL goes down by exactly one either way."""
    inner = scapy.IP(src="198.19.1.0", dst="198.19.2.9", ttl=9)
    sps = [bytes(inner / scapy.TCP(sport=4, dport=5, seq=s) / bytes(2500)) for s in (1, 5000)]
    headers = np.zeros(2, VNET_HDR_DTYPE)
    headers[:] = (1, 1, 40, 1000, 20, 16)
    h = Harness("udp", mtu=1200)
    h.engine.process_tx(PacketBatch.from_packets(sps, headroom=HEADROOM), headers, None)
    assert len(h.sent) == 6 and {scapy.IP(d).ttl for d, _, _ in h.sent} == {8}
    over = Harness("udp", mtu=900)  # 1040-byte segments refused, the 540-byte last one sent
    over.engine.process_tx(PacketBatch.from_packets(sps[:1], headroom=HEADROOM), headers[:1], None)
    assert over.counters[INDEX["drop_over_mtu"]] == 2
    assert [scapy.IP(d).ttl for d, _, _ in over.sent] == [8]
