"""dataplane/tx_tunnel.py: which superpackets go to the tunnel TAP (one write: headers + the packet as read)
and which keep the split path, with a file standing in for the TAP (the kernel side: tests/io)."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
from test_engine import PEER_MAC, Harness

from udpflannel.codec import tunnel_gso as tg
from udpflannel.dataplane import tx_tunnel
from udpflannel.dataplane.counters import INDEX
from udpflannel.dataplane.engine import HEADROOM
from udpflannel.dataplane.peers import Peer
from udpflannel.io.linux import TUN_VNET_TNL_HDR_LEN
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_TCPV4 as TCPV4
from udpflannel.packet.vnet import VNET_HDR_DTYPE, VnetHdr

scapy = pytest.importorskip("scapy.all")

TAP_MAC = bytes.fromhex("4a5d8c4b0a49")
PORTS = [32768, 32769, 32770, 32771]
MSS = 1370


def _tcp(payload_len: int = 10240, dst: str = "198.19.2.9", ttl: int = 64) -> bytes:
    inner = scapy.IP(src="198.19.1.0", dst=dst, flags="DF", ttl=ttl) / scapy.TCP(
        sport=4, dport=5, flags="A", seq=1000
    )
    return bytes(inner / bytes(i & 0xFF for i in range(payload_len)))


def _send(h: Harness, raw: bytes, vnet: tuple) -> None:
    batch = PacketBatch.from_packets([raw], headroom=HEADROOM)
    headers = np.zeros(1, VNET_HDR_DTYPE)
    headers[0] = vnet
    h.engine.process_tx(batch, headers, lambda i: VnetHdr(*headers[i].tolist()))


@pytest.fixture
def tap(tmp_path):
    path = tmp_path / "tap"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    yield fd, path
    os.close(fd)


def _harness(tap_fd: int, mtu: int = 1450, encap: str = "vxlan") -> Harness:
    h = Harness(encap, mtu=mtu)
    h.engine.use_tunnel(tap_fd, TAP_MAC, "198.18.0.1", PORTS if encap == "vxlan" else [8285])
    return h


def _peer_headers(h: Harness, src: str, dst: str) -> tg.TunnelHeaders:
    """The tunnel headers the engine should write to the peer (PEER_MAC at dst) from src."""
    our_mac = bytes.fromhex(h.engine.cfg.vtep_mac.replace(":", ""))
    encap = tg.vxlan_encap(1, our_mac, bytes.fromhex(PEER_MAC.replace(":", "")))
    return tg.TunnelHeaders.for_peer(tap_mac=TAP_MAC, src_ip=src, dst_ip=dst, dst_port=8472, encap=encap)


def test_a_tcp_superpacket_is_one_tap_write_of_headers_and_the_packet(tap):
    fd, path = tap
    h = _harness(fd)
    raw = _tcp()
    vnet = (1, TCPV4, 40, MSS, 20, 16)
    _send(h, raw, vnet)
    written = path.read_bytes()
    sport = PORTS[h.engine._flow_of(raw[:64])[1] % len(PORTS)]
    expected = _peer_headers(h, "198.18.0.1", "198.18.0.2").build(len(raw), vnet, sport, 0)
    assert written == bytes(expected) + raw
    k = -(-10240 // MSS)
    c = h.counters
    assert (c[INDEX["tx_tunnel_writes"]], c[INDEX["tx_superpackets"]], c[INDEX["tx_packets"]]) == (1, 1, k)
    assert c[INDEX["tx_bytes"]] == (k - 1) * 40 + len(raw)  # every segment carries the 40 header bytes
    assert h.sent == []  # nothing through the sockets
    # the next superpacket's outer IP id follows this one's segments
    _send(h, raw, vnet)
    ip_id = TUN_VNET_TNL_HDR_LEN + 14 + 4
    assert path.read_bytes()[len(written) :][ip_id : ip_id + 2] == k.to_bytes(2, "big")


@pytest.mark.parametrize(
    ("case", "vnet", "mtu"),
    [
        ("segments over the MTU", (1, TCPV4, 40, 1400, 20, 16), 1400),
        ("no partial checksum", (0, TCPV4, 40, MSS, 20, 16), 1450),
    ],
)
def test_what_the_tap_does_not_take_keeps_the_split_path(tap, case, vnet, mtu):
    fd, path = tap
    h = _harness(fd, mtu=mtu)
    _send(h, _tcp(), vnet)
    assert path.read_bytes() == b"" and h.counters[INDEX["tx_tunnel_writes"]] == 0
    if case == "segments over the MTU":
        # frag needed for each segment, as a router answers the packets it would have to forward
        assert h.counters[INDEX["icmp_sent"]] == h.counters[INDEX["drop_over_mtu"]] > 0


@pytest.mark.parametrize("v6", [False, True])
def test_a_udp_superpacket_from_a_gso_sender_is_one_tap_write_too(tap, v6):
    """USO (a pod sending with UDP_SEGMENT): the kernel segments UDP_L4 inside the tunnel as it does TCP; the
    inner Ethernet type follows the packet's IP version, which a UDP gso type does not tell."""
    fd, path = tap
    h = _harness(fd)
    if v6:
        h.engine.set_peers([Peer("fd00:198:2::/64", "198.18.0.2", PEER_MAC)])
        ip = scapy.IPv6(src="fd00:198:1::", dst="fd00:198:2::9")
        vnet = (1, 5, 48, 1300, 40, 6)
    else:
        ip = scapy.IP(src="198.19.1.0", dst="198.19.2.9")
        vnet = (1, 5, 28, 1300, 20, 6)
    raw = bytes(ip / scapy.UDP(sport=4, dport=5) / bytes(5000))
    _send(h, raw, vnet)
    sport = PORTS[h.engine._flow_of(raw[:64])[1] % len(PORTS)]
    expected = _peer_headers(h, "198.18.0.1", "198.18.0.2").build(len(raw), vnet, sport, 0, v6)
    written = path.read_bytes()
    assert written == bytes(expected) + raw and h.sent == []
    assert written[len(expected) - 2 : len(expected)] == (b"\x86\xdd" if v6 else b"\x08\x00")
    hl = 48 if v6 else 28
    k = -(-(len(raw) - hl) // 1300)
    assert (h.counters[INDEX["tx_tunnel_writes"]], h.counters[INDEX["tx_packets"]]) == (1, k)
    assert h.counters[INDEX["tx_bytes"]] == (k - 1) * hl + len(raw)


def test_a_peer_over_the_ipv6_underlay_keeps_the_split_path_unless_the_tap_forwards_ipv6(tap):
    fd, path = tap
    h = _harness(fd)
    h.engine.set_peers([Peer("198.19.2.0/24", "fd00:198::2", PEER_MAC)])
    _send(h, _tcp(), (1, TCPV4, 40, MSS, 20, 16))
    assert path.read_bytes() == b"" and h.sent and h.sent[0][1][0] == "fd00:198::2"
    # With our IPv6 underlay address (and the IPv6 pool's ports): one write with an IPv6 outer header.
    h = Harness("vxlan", mtu=1430)
    ports6 = [33000, 33001, 33002, 33003]
    h.engine.use_tunnel(fd, TAP_MAC, "198.18.0.1", PORTS, src_ip6="fd00:198::1", ports6=ports6)
    h.engine.set_peers([Peer("198.19.2.0/24", "fd00:198::2", PEER_MAC)])
    raw = _tcp()
    vnet = (1, TCPV4, 40, MSS, 20, 16)
    _send(h, raw, vnet)
    written = path.read_bytes()
    headers = _peer_headers(h, "fd00:198::1", "fd00:198::2")
    sport = ports6[h.engine._flow_of(raw[:64])[1] % len(ports6)]
    assert headers.outer_v6 and written == bytes(headers.build(len(raw), vnet, sport, 0)) + raw
    assert h.sent == [] and h.counters[INDEX["tx_tunnel_writes"]] == 1


def test_a_refused_write_falls_back_and_a_failed_one_is_counted(tap, monkeypatch):
    fd, _ = tap
    h = _harness(fd)

    def refuse(_fd, _iov):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(tx_tunnel.os, "writev", refuse)
    _send(h, _tcp(), (1, TCPV4, 40, MSS, 20, 16))
    assert h.sent and h.counters[INDEX["tx_tunnel_writes"]] == 0  # the split path sent it

    def no_buffers(_fd, _iov):
        raise OSError(errno.ENOBUFS, "No buffer space available")

    monkeypatch.setattr(tx_tunnel.os, "writev", no_buffers)
    before = len(h.sent)
    _send(h, _tcp(), (1, TCPV4, 40, MSS, 20, 16))
    assert len(h.sent) == before and h.counters[INDEX["drop_send_error"]] == -(-10240 // MSS)


def test_the_udp_format_goes_to_the_tap_with_its_ttl_one_lower(tap):
    fd, path = tap
    h = _harness(fd, mtu=1472, encap="udp")
    raw = _tcp()
    vnet = (1, TCPV4, 40, MSS, 20, 16)
    _send(h, raw, vnet)
    written = path.read_bytes()
    headers = tg.TunnelHeaders.for_peer(
        tap_mac=TAP_MAC, src_ip="198.18.0.1", dst_ip="198.18.0.2", dst_port=8285
    )
    assert len(written) == headers.prefix_len + len(raw) and h.sent == []
    prefix, inner = written[: headers.prefix_len], written[headers.prefix_len :]
    assert prefix == bytes(headers.build(len(raw), vnet, 8285, 0))
    # flannel's udp proxy routes like a router: TTL 64 -> 63, nothing else changed (the kernel's
    # segmentation computes every segment's header checksum)
    assert inner[8] == 63 and inner[:8] + inner[9:] == raw[:8] + raw[9:]
    assert h.counters[INDEX["tx_tunnel_writes"]] == 1


def test_the_udp_format_answers_an_expiring_ttl_on_the_split_path(tap):
    fd, path = tap
    h = _harness(fd, mtu=1472, encap="udp")
    _send(h, _tcp(ttl=1), (1, TCPV4, 40, MSS, 20, 16))
    assert path.read_bytes() == b"" and h.counters[INDEX["tx_tunnel_writes"]] == 0
    assert h.counters[INDEX["icmp_sent"]] >= 1  # time exceeded, as a router answers
