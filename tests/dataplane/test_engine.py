"""dataplane/engine.py driven without sockets: fake TUN and UDP objects, scapy-built packets."""

from __future__ import annotations

import numpy as np
import pytest

from udpflannel.codec import vxlan
from udpflannel.dataplane.counters import INDEX, SLOTS
from udpflannel.dataplane.engine import Engine, EngineConfig, flow_hash
from udpflannel.dataplane.peers import Peer
from udpflannel.packet.batch import PacketBatch

scapy = pytest.importorskip("scapy.all")

OUR_MAC = "02:00:00:00:00:01"
PEER_MAC = "02:00:00:00:00:02"


class FakeTun:
    def __init__(self, packets: list[bytes]) -> None:
        self.inbox = list(packets)
        self.written: list[bytes] = []

    def read_batch(self, batch: PacketBatch, max_n: int) -> int:
        n = 0
        while self.inbox and n < max_n:
            p = self.inbox.pop(0)
            batch.buf[n, batch.offset : batch.offset + len(p)] = np.frombuffer(p, np.uint8)
            batch.lengths[n] = len(p)
            n += 1
        batch.n = n
        return n

    def write(self, packet) -> bool:
        self.written.append(bytes(packet))
        return True


class FakeUdp:
    def __init__(self, datagrams: list[tuple[bytes, str]] = (), pool: int = 4) -> None:  # type: ignore[assignment]
        self.inbox = list(datagrams)
        self.sent: list[tuple[bytes, tuple[str, int], int]] = []
        self.pool = [object()] * pool

    def recv_batch(self, batch: PacketBatch, max_n: int) -> list[str]:
        sources = []
        n = 0
        while self.inbox and n < max_n:
            d, src = self.inbox.pop(0)
            batch.buf[n, batch.offset : batch.offset + len(d)] = np.frombuffer(d, np.uint8)
            batch.lengths[n] = len(d)
            sources.append(src)
            n += 1
        batch.n = n
        return sources

    def send(self, sock_index, views, dsts) -> int:
        for i, (v, d) in enumerate(zip(views, dsts, strict=True)):
            self.sent.append((bytes(v), d, int(sock_index[i])))
        return 0


def _engine(encap: str, tun_packets=(), datagrams=(), mtu: int = 1450):
    cfg = EngineConfig(
        encap=encap,
        mtu=mtu,
        port=8472 if encap == "vxlan" else 8285,
        vtep_mac=OUR_MAC,
        icmp_src_v4="198.19.1.0",
        icmp_src_v6="fd00:198:19:1::",
    )
    counters = np.zeros(SLOTS, dtype=np.int64)
    eng = Engine(cfg, FakeTun(list(tun_packets)), FakeUdp(list(datagrams)), counters)
    eng.set_peers(
        [Peer("198.19.2.0/24", "198.18.0.2", PEER_MAC), Peer("fd00:198:19:2::/64", "198.18.0.2", PEER_MAC)]
    )
    return eng, counters


def _ip(dst: str = "198.19.2.5", size: int = 100, ttl: int = 64, df: bool = True, sport: int = 1000) -> bytes:
    pkt = scapy.IP(src="198.19.1.0", dst=dst, ttl=ttl, flags="DF" if df else 0) / scapy.UDP(
        sport=sport, dport=9
    )
    return bytes(pkt / bytes(size))


def test_vxlan_tx_encapsulates_to_the_peer():
    inner = [
        _ip(),
        _ip(sport=2000),
        bytes(scapy.IPv6(src="fd00:198:19:1::", dst="fd00:198:19:2::7") / scapy.UDP()),
    ]
    eng, c = _engine("vxlan", inner)
    assert eng.tx_once() == 3
    assert len(eng.udp.sent) == 3
    for (data, dst, _), orig in zip(eng.udp.sent, inner, strict=True):
        assert dst == ("198.18.0.2", 8472)
        frame = vxlan.decode_vxlan(data, 1, vxlan.parse_mac(PEER_MAC))
        assert isinstance(frame, vxlan.VxlanFrame) and frame.inner == orig
        assert frame.src_mac == vxlan.parse_mac(OUR_MAC)
    assert c[INDEX["tx_packets"]] == 3


def test_unknown_peer_gets_net_unreachable_and_is_counted():
    eng, c = _engine("vxlan", [_ip(dst="198.19.9.9")])
    eng.tx_once()
    assert eng.udp.sent == []
    assert c[INDEX["drop_unknown_peer"]] == 1
    reply = scapy.IP(eng.tun.written[0])
    assert reply.dst == "198.19.1.0" and reply[scapy.ICMP].type == 3 and reply[scapy.ICMP].code == 0


@pytest.mark.parametrize("df", [True, False])
def test_too_big_answers_frag_needed_only_with_df(df):
    eng, c = _engine("vxlan", [_ip(size=1500, df=df)], mtu=1450)
    eng.tx_once()
    assert eng.udp.sent == [] and c[INDEX["drop_too_big"]] == 1
    if df:
        icmp = scapy.IP(eng.tun.written[0])[scapy.ICMP]
        assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, 1450)
    else:
        assert eng.tun.written == []


def test_ipv6_too_big_answers_packet_too_big():
    big = bytes(scapy.IPv6(src="fd00:198:19:1::", dst="fd00:198:19:2::7") / scapy.UDP() / bytes(1500))
    eng, _ = _engine("vxlan", [big], mtu=1450)
    eng.tx_once()
    reply = scapy.IPv6(eng.tun.written[0])
    assert reply[scapy.ICMPv6PacketTooBig].mtu == 1450


def test_udp_tx_decrements_ttl_and_expires_at_one():
    eng, c = _engine("udp", [_ip(ttl=64), _ip(ttl=1)])
    eng.tx_once()
    assert len(eng.udp.sent) == 1
    out = scapy.IP(eng.udp.sent[0][0])
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
    assert eng.rx_once() == 5
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
        while eng.rx_once() or eng.tx_once():
            pass
        assert c[INDEX["drop_internal_error"]] == 0


def test_flow_hash_is_stable_per_flow_and_spreads_flows():
    batch = PacketBatch.from_packets(
        [_ip(sport=p) for p in range(1000, 1064)] + [_ip(sport=1000)], headroom=8
    )
    h = flow_hash(batch.buf, batch.offset, batch.n)
    assert h[0] == h[-1]
    assert len(set((h[:-1] % 16).tolist())) >= 12
