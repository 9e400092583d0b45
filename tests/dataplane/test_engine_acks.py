"""The engine's ACK filter: of a TUN read's pure ACKs of one flow only the last leaves (counted as
tx_acks_filtered), of a receive's only the last is written (rx_acks_filtered), everything else goes as
before, and UDPFLANNEL_ACK_FILTER=0 sends and writes all."""

from __future__ import annotations

import numpy as np
import pytest
from test_engine import OUR_MAC, PEER_MAC, _engine

from udpflannel.codec import vxlan
from udpflannel.dataplane.counters import INDEX
from udpflannel.dataplane.engine import HEADROOM
from udpflannel.io.linux import ACK_FILTER_ENV
from udpflannel.packet import reference
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.vnet import VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_DTYPE

scapy = pytest.importorskip("scapy.all")


def _ack(n: int, sport: int = 5201) -> bytes:
    ip = scapy.IP(src="198.19.1.2", dst="198.19.2.5", flags="DF")
    stamps = [("NOP", None), ("NOP", None), ("Timestamp", (n, 7))]
    return bytes(ip / scapy.TCP(sport=sport, dport=40000, flags="A", ack=n, window=500, options=stamps))


def _ping() -> bytes:
    return bytes(scapy.IP(src="198.19.1.2", dst="198.19.2.5") / scapy.ICMP(seq=1) / bytes(56))


def _inner(sent, encap: str) -> list[bytes]:
    if encap == "udp":
        return [d for d, _, _ in sent]
    return [vxlan.decode_vxlan(d, 1, vxlan.parse_mac(PEER_MAC)).inner for d, _, _ in sent]


def _ttl_free(pkt: bytes) -> bytes:
    """The packet with TTL and IPv4 checksum zeroed: the udp backend takes the TTL down on the way out."""
    return pkt[:8] + b"\0" + pkt[9:10] + b"\0\0" + pkt[12:]


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
def test_a_reads_redundant_acks_stay_home(encap):
    read = [_ack(1000), _ping(), _ack(2448, sport=6000), _ack(2448), _ack(3896)]
    h, c = _engine(encap, read)
    h.engine.tx_once()
    got = [_ttl_free(p) for p in _inner(h.sent, encap)]
    assert got == [_ttl_free(read[i]) for i in (1, 2, 4)]  # the ping, the other flow's ACK, the last ACK
    assert c[INDEX["tx_acks_filtered"]] == 2 and c[INDEX["tx_packets"]] == 3
    assert sum(c[INDEX[name]] for name in INDEX if name.startswith("drop_")) == 0  # not drops


def test_the_filter_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(ACK_FILTER_ENV, "0")
    read = [_ack(1000), _ack(2448), _ack(3896)]
    h, c = _engine("vxlan", read)
    h.engine.tx_once()
    assert _inner(h.sent, "vxlan") == read
    assert c[INDEX["tx_acks_filtered"]] == 0 and c[INDEX["tx_packets"]] == 3


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
def test_a_read_of_many_acks_keeps_one_per_flow(encap):
    # 20 rows with one virtio header: the read send_run takes whole unless they are ACKs to filter
    read = [_ack(1000 + 1448 * i, sport=5201 + i % 2) for i in range(20)]
    h, c = _engine(encap, read)
    h.engine.tx_once()
    got = [_ttl_free(p) for p in _inner(h.sent, encap)]
    assert got == [_ttl_free(read[i]) for i in (18, 19)]
    assert c[INDEX["tx_acks_filtered"]] == 18 and c[INDEX["tx_packets"]] == 2


def test_a_read_of_many_acks_with_nothing_to_filter_leaves_whole():
    read = [_ack(5000, sport=5201 + i) for i in range(20)]  # 20 flows, one ACK each
    h, c = _engine("vxlan", read)
    h.engine.tx_once()
    # every one leaves (flows on different source ports: not in read order)
    assert sorted(_inner(h.sent, "vxlan")) == sorted(read) and c[INDEX["tx_acks_filtered"]] == 0


def test_acks_between_superpackets_are_filtered_run_by_run():
    # A bidirectional flow's read: ACKs of the flow we receive around a superpacket of the one we send.
    # ACKs in one run between superpackets are filtered; an ACK is never judged against one across a
    # superpacket.
    ip = scapy.IP(src="198.19.1.2", dst="198.19.2.5", flags="DF")
    sp = bytearray(bytes(ip / scapy.TCP(sport=40000, dport=5201, flags="A") / bytes(3000)))
    sp[36:38] = reference.pseudo_header(bytes(sp), 6, len(sp) - 20).to_bytes(2, "big")
    read = [_ack(1000), bytes(sp), _ack(2448), _ack(3896)]
    plain = (0, 0, 0, 0, 0, 0)
    headers = [plain, (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 40, 1000, 20, 16), plain, plain]
    h, c = _engine("vxlan")
    h.engine.process_tx(
        PacketBatch.from_packets(read, headroom=HEADROOM), np.array(headers, VNET_HDR_DTYPE), None
    )
    got = _inner(h.sent, "vxlan")
    assert got[0] == read[0] and got[-1] == read[3] and read[2] not in got
    assert len(got) == 2 + 3  # the two ACKs, the superpacket as three segments
    assert c[INDEX["tx_acks_filtered"]] == 1


def _peer_ack(n: int) -> bytes:
    ip = scapy.IP(src="198.19.2.5", dst="198.19.1.2", flags="DF")
    return bytes(ip / scapy.TCP(sport=40000, dport=5201, flags="A", ack=n, window=500))


@pytest.mark.parametrize("encap", ["vxlan", "udp"])
def test_a_receives_redundant_acks_are_not_written(encap):
    # a few datagrams (the per-row receive): a peer's ACKs of one flow and a ping between them
    ping = bytes(scapy.IP(src="198.19.2.5", dst="198.19.1.2") / scapy.ICMP(seq=1) / bytes(8))
    inner = [_peer_ack(1000), ping, _peer_ack(2448), _peer_ack(3896)]
    mac = vxlan.parse_mac(PEER_MAC)
    frames = [
        vxlan.encode_vxlan(p, 1, mac, vxlan.parse_mac(OUR_MAC)) if encap == "vxlan" else p for p in inner
    ]
    h, c = _engine(encap, datagrams=[(f, "198.18.0.2") for f in frames])
    h.engine.rx_once()
    assert h.tun.written == [inner[1], inner[3]]
    assert (c[INDEX["rx_acks_filtered"]], c[INDEX["rx_packets"]]) == (2, 2)
