"""The bytes in front of a whole TCP (or UDP) superpacket that a UDP-tunnel GSO write carries
(io/tunnel_tap.py): the 24-byte virtio header (virtio_net_hdr_v1_hash_tunnel, Linux 6.17+), outer Ethernet,
IPv4 (IPv6 to a peer over the IPv6 underlay, as flannel-v6.1 sends) and UDP, then the encapsulation between
the UDP header and the inner IP packet: VXLAN and inner Ethernet for vxlan, nothing for flannel's udp format.
The kernel cuts the superpacket into wire-size frames, copying these headers into each and fixing every
length, id and checksum, so the frames are what kernel flannel.1 (or flanneld's udp proxy) sends, UDP
checksum included (which the receiving agent's UDP GRO needs). Sans-I/O: no sockets; one small bytearray
per superpacket."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from udpflannel.codec.wire import (
    ETH_HEADER_LEN,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    VXLAN_FLAGS_I,
    VXLAN_HEADER,
)
from udpflannel.io.linux import TUN_VNET_TNL_HDR_LEN
from udpflannel.packet import headers as h
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6,
)

# virtio_net_hdr_v1_hash_tunnel: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers,
# (hash), outer_th_offset, inner_nh_offset
_VNET = struct.Struct("<BBHHHHH8xHH")
assert _VNET.size == TUN_VNET_TNL_HDR_LEN

IPV4_HLEN, IPV6_HLEN, UDP_HLEN = h.IPV4_MIN_HLEN, h.IPV6_HLEN, h.UDP_HLEN
OUTER_TH = ETH_HEADER_LEN + IPV4_HLEN  # where the outer UDP header starts: 34
OUTER_TH_V6 = ETH_HEADER_LEN + IPV6_HLEN  # 54
# The kernel forwards the frame (TTL - 1): 65 leaves the wire with 64, what a UDP socket sends.
FORWARD_TTL = 65
IP_DF = 0x4000  # as our UDP sockets send (path MTU discovery on)
_TOTAL, _IP_CSUM = 2, 10  # outer IPv4 field offsets (total length and id, checksum)
_PAYLOAD_LEN = 4  # outer IPv6 payload length


def vxlan_encap(vni: int, our_mac: bytes, peer_mac: bytes) -> bytes:
    """What vxlan puts between the UDP header and the inner packet: the VXLAN header and the inner Ethernet
    header (its type is set per superpacket)."""
    return VXLAN_HEADER.pack(VXLAN_FLAGS_I, vni << 8) + peer_mac + our_mac + struct.pack("!H", ETHERTYPE_IPV4)


def _fold(s: int) -> int:
    """One's complement fold to 16 bits (never 0 for a nonzero sum)."""
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


@dataclass
class TunnelHeaders:
    """Per peer: the constant bytes and sums, so a superpacket costs a copy and a few fields."""

    template: bytearray  # the prefix, per-superpacket fields zero
    ip_sum: int  # the outer IPv4 header's constant words, summed (0 over IPv6, which has no checksum)
    pseudo: int  # the outer UDP pseudo-header without its length, summed
    inner_nh: int  # where the inner IP packet starts, counted from the outer Ethernet header
    ethertype: bool  # the encapsulation ends in an Ethernet type that follows the inner IP version
    outer_v6: bool = False

    @property
    def prefix_len(self) -> int:
        return TUN_VNET_TNL_HDR_LEN + self.inner_nh

    @property
    def outer_th(self) -> int:
        return OUTER_TH_V6 if self.outer_v6 else OUTER_TH

    @property
    def max_inner(self) -> int:
        """The longest inner packet: the outer IPv4 total length (IPv6 payload length) must fit 16 bits."""
        return 0xFFFF - (self.inner_nh - (self.outer_th if self.outer_v6 else ETH_HEADER_LEN))

    @classmethod
    def for_peer(
        cls, *, tap_mac: bytes, src_ip: str, dst_ip: str, dst_port: int, encap: bytes = b""
    ) -> TunnelHeaders:
        """tap_mac: the tunnel TAP's own address (the frame must look addressed to it); src_ip/dst_ip: our
        and the peer's underlay addresses, both IPv4 or both IPv6; encap: what goes between the UDP header
        and the inner packet (vxlan_encap, or nothing for flannel's udp format)."""
        v6 = ":" in dst_ip
        family = socket.AF_INET6 if v6 else socket.AF_INET
        src, dst = socket.inet_pton(family, src_ip), socket.inet_pton(family, dst_ip)
        outer_th = OUTER_TH_V6 if v6 else OUTER_TH
        inner_nh = outer_th + UDP_HLEN + len(encap)
        t = bytearray(TUN_VNET_TNL_HDR_LEN + inner_nh)
        e = TUN_VNET_TNL_HDR_LEN
        # any unicast source will do: the TAP's own address with the lowest bit of its last byte flipped
        ethertype = struct.pack("!H", ETHERTYPE_IPV6 if v6 else ETHERTYPE_IPV4)
        t[e : e + ETH_HEADER_LEN] = tap_mac + tap_mac[:5] + bytes([tap_mac[5] ^ 1]) + ethertype
        ip = e + ETH_HEADER_LEN
        if v6:  # (the hop limit goes down by one on the way out, like IPv4's TTL)
            struct.pack_into("!IHBB16s16s", t, ip, 6 << 28, 0, socket.IPPROTO_UDP, FORWARD_TTL, src, dst)
            ip_sum = 0
        else:
            struct.pack_into(
                "!BBHHHBBH4s4s", t, ip, 0x45, 0, 0, 0, IP_DF, FORWARD_TTL, socket.IPPROTO_UDP, 0, src, dst
            )
            ip_sum = sum(struct.unpack("!10H", t[ip : ip + IPV4_HLEN]))
        udp = e + outer_th
        struct.pack_into("!HHHH", t, udp, 0, dst_port, 0, 0)
        t[udp + UDP_HLEN :] = encap
        addrs = struct.unpack(f"!{len(src + dst) // 2}H", src + dst)
        return cls(
            t, ip_sum, sum(addrs) + socket.IPPROTO_UDP, inner_nh, len(encap) >= ETH_HEADER_LEN, outer_v6=v6
        )

    def build(
        self,
        inner_len: int,
        vnet: tuple[int, int, int, int, int, int],
        sport: int,
        ip_id: int,
        inner_v6: bool | None = None,
    ) -> bytearray:
        """The prefix for one superpacket of inner_len bytes as read from the TUN with virtio header `vnet`
        (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: a TCP or UDP superpacket with
        NEEDS_CSUM, its checksum field holding the pseudo-header sum, as the kernel hands them out). ip_id:
        the outer IPv4 id of its first frame (IPv6 has none). inner_v6: the inner packet is IPv6 (default:
        as its TCP gso type says; a UDP one does not say)."""
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet
        inner_nh = self.inner_nh
        v6_out = self.outer_v6
        outer_th = self.outer_th
        out = self.template[:]
        _VNET.pack_into(
            out,
            0,
            flags | VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM,
            gso_type | (VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6 if v6_out else VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4),
            hdr_len + inner_nh,
            gso_size,
            csum_start + inner_nh,
            csum_offset,
            0,
            outer_th,
            inner_nh,
        )
        ip = TUN_VNET_TNL_HDR_LEN + ETH_HEADER_LEN
        udp_len = inner_len + (inner_nh - outer_th)
        if v6_out:
            struct.pack_into("!H", out, ip + _PAYLOAD_LEN, udp_len)
        else:
            total = udp_len + IPV4_HLEN
            struct.pack_into("!HH", out, ip + _TOTAL, total, ip_id)
            struct.pack_into("!H", out, ip + _IP_CSUM, 0xFFFF - _fold(self.ip_sum + total + ip_id))
        udp = TUN_VNET_TNL_HDR_LEN + outer_th
        # UDP_TUNNEL_CSUM: the field holds the pseudo-header sum (length included, not complemented),
        # which the kernel turns into each frame's checksum (net/ipv4/udp_offload.c).
        struct.pack_into("!H", out, udp, sport)  # (a pad byte in a format would zero the port after it)
        struct.pack_into("!HH", out, udp + 4, udp_len, _fold(self.pseudo + udp_len))
        if self.ethertype:
            if inner_v6 is None:
                inner_v6 = gso_type & ~VIRTIO_NET_HDR_GSO_ECN == VIRTIO_NET_HDR_GSO_TCPV6
            struct.pack_into("!H", out, len(out) - 2, ETHERTYPE_IPV6 if inner_v6 else ETHERTYPE_IPV4)
        return out
