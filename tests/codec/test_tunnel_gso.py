"""codec/tunnel_gso.py: the headers of a UDP-tunnel GSO write, read back by scapy and checked by hand."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from udpflannel.codec import tunnel_gso as tg
from udpflannel.io.linux import TUN_VNET_TNL_HDR_LEN
from udpflannel.packet import vnet
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_ECN as ECN
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_TCPV4 as TCPV4
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_TCPV6 as TCPV6

TAP_MAC = bytes.fromhex("4a5d8c4b0a49")
OUR_MAC, PEER_MAC = bytes.fromhex("025a00000001"), bytes.fromhex("025a00000002")
SRC, DST = "198.18.0.1", "198.18.0.2"
# A TCP superpacket's virtio header as the TUN hands it out: NEEDS_CSUM, TCPV4, hdr_len, gso_size 1398,
# csum_start 20 (after the IPv4 header), csum_offset 16.
TUN_VNET = (1, TCPV4, 52, 1398, 20, 16)


def _headers() -> tg.TunnelHeaders:
    return tg.TunnelHeaders.for_peer(
        tap_mac=TAP_MAC, src_ip=SRC, dst_ip=DST, dst_port=8472, encap=tg.vxlan_encap(1, OUR_MAC, PEER_MAC)
    )


def _sum16(data: bytes) -> int:
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def test_outer_headers_are_a_vxlan_frame_from_us_to_the_peer():
    inner_len = 20 + 32 + 46 * 1398
    prefix = _headers().build(inner_len, TUN_VNET, 32777, 5)
    assert len(prefix) == _headers().prefix_len == 88
    frame = Ether(bytes(prefix[TUN_VNET_TNL_HDR_LEN:]) + bytes(64))
    # addressed to the TAP (so it takes the frame in), from an address one bit off its own
    assert (frame.dst, frame.src) == ("4a:5d:8c:4b:0a:49", "4a:5d:8c:4b:0a:48")
    ip = frame[IP]
    assert (ip.src, ip.dst, ip.ttl, ip.proto, ip.id, str(ip.flags)) == (SRC, DST, 65, 17, 5, "DF")
    assert ip.len == 20 + 8 + 8 + 14 + inner_len
    # a valid header checksum: the whole header sums to 0xFFFF
    assert _sum16(bytes(prefix[38:58])) == 0xFFFF
    udp = frame[UDP]
    assert (udp.sport, udp.dport, udp.len) == (32777, 8472, 8 + 8 + 14 + inner_len)
    # UDP_TUNNEL_CSUM wants the pseudo-header sum, length included, not complemented
    pseudo = socket.inet_aton(SRC) + socket.inet_aton(DST) + struct.pack("!HH", 17, udp.len)
    assert udp.chksum == _sum16(pseudo)
    vx = frame[VXLAN]
    assert vx.vni == 1 and vx.flags == 0x08
    inner = vx.payload
    assert (inner.dst, inner.src, inner.type) == ("02:5a:00:00:00:02", "02:5a:00:00:00:01", 0x0800)


def test_virtio_header_asks_for_udp_tunnel_gso_with_outer_checksums():
    prefix = _headers().build(1000, TUN_VNET, 40000, 0)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, nbuf = struct.unpack_from("<BBHHHHH", prefix)
    outer_th, inner_nh = struct.unpack_from("<HH", prefix, 20)
    assert flags == vnet.VIRTIO_NET_HDR_F_NEEDS_CSUM | vnet.VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM
    assert gso_type == TCPV4 | vnet.VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4
    assert (hdr_len, gso_size, csum_start, csum_offset, nbuf) == (52 + 64, 1398, 20 + 64, 16, 0)
    assert (outer_th, inner_nh) == (34, 64)
    assert prefix[12:20] == bytes(8)  # the hash fields


@pytest.mark.parametrize(
    ("gso_type", "ethertype"),
    [(TCPV6, 0x86DD), (TCPV6 | ECN, 0x86DD), (TCPV4, 0x0800)],
)
def test_inner_ethertype_and_ecn_follow_the_superpacket(gso_type, ethertype):
    prefix = _headers().build(1000, (1, gso_type, 72, 1378, 40, 16), 40000, 0)
    assert struct.unpack_from("!H", prefix, len(prefix) - 2)[0] == ethertype
    assert prefix[1] == gso_type | vnet.VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4


def test_each_build_is_a_fresh_copy_of_the_template():
    h = _headers()
    a = h.build(1000, TUN_VNET, 40000, 1)
    b = h.build(2000, TUN_VNET, 40001, 2)
    assert a != b and h.template[TUN_VNET_TNL_HDR_LEN + 14 + 2 : TUN_VNET_TNL_HDR_LEN + 14 + 4] == b"\0\0"


def test_the_udp_format_puts_the_inner_packet_right_after_the_udp_header():
    h = tg.TunnelHeaders.for_peer(tap_mac=TAP_MAC, src_ip=SRC, dst_ip=DST, dst_port=8285)
    assert (h.prefix_len, h.inner_nh, h.max_inner) == (66, 42, 0xFFFF - 28)
    inner = bytes(IP(src="198.19.1.0", dst="198.19.2.9", ttl=63) / TCP() / bytes(100))
    prefix = h.build(len(inner), TUN_VNET, 8285, 9)
    frame = Ether(bytes(prefix[TUN_VNET_TNL_HDR_LEN:]) + inner)
    assert (frame[UDP].sport, frame[UDP].dport, frame[UDP].len) == (8285, 8285, 8 + len(inner))
    assert frame[IP].len == 28 + len(inner)
    assert IP(bytes(frame[UDP].payload)).dst == "198.19.2.9"  # (scapy does not know port 8285)
    _, _, hdr_len, _, csum_start, _ = struct.unpack_from("<BBHHHH", prefix)
    assert (hdr_len, csum_start, struct.unpack_from("<HH", prefix, 20)) == (52 + 42, 20 + 42, (34, 42))


def test_to_a_peer_over_ipv6_the_outer_header_is_ipv6():
    """flannel-v6.1's frames: outer IPv6 (hop limit 65, one less on the wire), the UDP checksum field the
    IPv6 pseudo-header sum, the virtio header's outer type and offsets for a 40-byte header."""
    src6, dst6 = "fd00:198::1", "fd00:198::2"
    h = tg.TunnelHeaders.for_peer(
        tap_mac=TAP_MAC, src_ip=src6, dst_ip=dst6, dst_port=8472, encap=tg.vxlan_encap(1, OUR_MAC, PEER_MAC)
    )
    assert (h.prefix_len, h.inner_nh, h.max_inner) == (108, 84, 0xFFFF - 30)
    inner_len = 40 + 32 + 46 * 1378
    v6_tun = (1, TCPV6, 72, 1378, 40, 16)
    prefix = h.build(inner_len, v6_tun, 32800, 7)
    flags, gso_type, hdr_len, gso_size, csum_start, _ = struct.unpack_from("<BBHHHH", prefix)
    assert flags == vnet.VIRTIO_NET_HDR_F_NEEDS_CSUM | vnet.VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM
    assert gso_type == TCPV6 | vnet.VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6
    assert (hdr_len, gso_size, csum_start) == (72 + 84, 1378, 40 + 84)
    assert struct.unpack_from("<HH", prefix, 20) == (54, 84)
    frame = Ether(bytes(prefix[TUN_VNET_TNL_HDR_LEN:]) + bytes(64))
    assert frame.type == 0x86DD
    ip6 = frame[IPv6]
    assert (ip6.src, ip6.dst, ip6.nh, ip6.hlim, ip6.plen) == (src6, dst6, 17, 65, 8 + 8 + 14 + inner_len)
    udp = frame[UDP]
    assert (udp.sport, udp.dport, udp.len) == (32800, 8472, ip6.plen)
    pseudo = socket.inet_pton(socket.AF_INET6, src6) + socket.inet_pton(socket.AF_INET6, dst6)
    assert udp.chksum == _sum16(pseudo + struct.pack("!IHH", udp.len, 0, 17))
    vx = frame[VXLAN]
    assert vx.vni == 1 and vx.payload.type == 0x86DD  # the inner packet is IPv6 too
