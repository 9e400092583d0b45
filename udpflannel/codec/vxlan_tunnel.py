"""The bytes in front of a whole TCP superpacket that a UDP-tunnel GSO write carries (io/tunnel_tap.py): the
24-byte virtio header (virtio_net_hdr_v1_hash_tunnel, Linux 6.17+), then outer Ethernet, IPv4 and UDP, the
VXLAN header and the inner Ethernet header. The kernel cuts the superpacket into wire-size VXLAN frames,
copying these headers into each and fixing every length, id and checksum, so the frames are what kernel
flannel.1 sends, UDP checksum included (which the receiving agent's UDP GRO needs). Sans-I/O: no sockets,
no numpy; one small bytearray per superpacket."""

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
    VXLAN_HEADER_LEN,
)
from udpflannel.io.linux import TUN_VNET_TNL_HDR_LEN
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4,
)

# virtio_net_hdr_v1_hash_tunnel: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers,
# (hash), outer_th_offset, inner_nh_offset
_VNET = struct.Struct("<BBHHHHH8xHH")
assert _VNET.size == TUN_VNET_TNL_HDR_LEN

IPV4_HLEN = 20
UDP_HLEN = 8
OUTER_TH = ETH_HEADER_LEN + IPV4_HLEN  # where the outer UDP header starts: 34
INNER_NH = OUTER_TH + UDP_HLEN + VXLAN_HEADER_LEN + ETH_HEADER_LEN  # where the inner IP packet starts: 64
PREFIX_LEN = TUN_VNET_TNL_HDR_LEN + INNER_NH  # 88 bytes written in front of the inner packet
MAX_INNER = 0xFFFF - (INNER_NH - ETH_HEADER_LEN)  # the outer IPv4 total length must fit 16 bits
# The kernel forwards the frame (TTL - 1): 65 leaves the wire with 64, what a UDP socket sends.
FORWARD_TTL = 65
IP_DF = 0x4000  # as our UDP sockets send (path MTU discovery on)
_TOTAL, _IP_CSUM = 2, 10  # outer IPv4 field offsets (total length and id, checksum)


def _fold(s: int) -> int:
    """One's complement fold to 16 bits (never 0 for a nonzero sum)."""
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


@dataclass
class TunnelHeaders:
    """Per peer: the constant bytes and sums, so a superpacket costs a copy and seven fields."""

    template: bytearray  # PREFIX_LEN bytes, the per-superpacket fields zero
    ip_sum: int  # the outer IPv4 header's constant words, summed
    pseudo: int  # the outer UDP pseudo-header without its length, summed

    @classmethod
    def for_peer(
        cls,
        *,
        tap_mac: bytes,
        src_ip: str,
        dst_ip: str,
        dst_port: int,
        vni: int,
        our_mac: bytes,
        peer_mac: bytes,
    ) -> TunnelHeaders:
        """tap_mac: the tunnel TAP's own address (the frame must look addressed to it); src_ip/dst_ip: our
        and the peer's underlay IPv4 addresses; our_mac/peer_mac: the VTEP MACs of the inner Ethernet."""
        src, dst = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
        t = bytearray(PREFIX_LEN)
        e = TUN_VNET_TNL_HDR_LEN
        t[e : e + ETH_HEADER_LEN] = tap_mac + our_mac + struct.pack("!H", ETHERTYPE_IPV4)
        ip = e + ETH_HEADER_LEN
        struct.pack_into(
            "!BBHHHBBH4s4s", t, ip, 0x45, 0, 0, 0, IP_DF, FORWARD_TTL, socket.IPPROTO_UDP, 0, src, dst
        )
        udp = ip + IPV4_HLEN
        struct.pack_into("!HHHH", t, udp, 0, dst_port, 0, 0)
        VXLAN_HEADER.pack_into(t, udp + UDP_HLEN, VXLAN_FLAGS_I, vni << 8)
        inner_eth = udp + UDP_HLEN + VXLAN_HEADER_LEN
        t[inner_eth : inner_eth + 12] = peer_mac + our_mac
        words = struct.unpack("!10H", t[ip : ip + IPV4_HLEN])
        addrs = struct.unpack("!4H", src + dst)
        return cls(t, sum(words), sum(addrs) + socket.IPPROTO_UDP)

    def build(
        self, inner_len: int, vnet: tuple[int, int, int, int, int, int], sport: int, ip_id: int
    ) -> bytearray:
        """The PREFIX_LEN bytes for one superpacket of inner_len bytes as read from the TUN with virtio
        header `vnet` (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: a TCP superpacket with
        NEEDS_CSUM, its checksum field holding the pseudo-header sum, as the kernel hands them out)."""
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet
        out = self.template[:]
        _VNET.pack_into(
            out,
            0,
            flags | VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM,
            gso_type | VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4,
            hdr_len + INNER_NH,
            gso_size,
            csum_start + INNER_NH,
            csum_offset,
            0,
            OUTER_TH,
            INNER_NH,
        )
        ip = TUN_VNET_TNL_HDR_LEN + ETH_HEADER_LEN
        udp_len = inner_len + (INNER_NH - OUTER_TH)
        total = udp_len + IPV4_HLEN
        struct.pack_into("!HH", out, ip + _TOTAL, total, ip_id)
        struct.pack_into("!H", out, ip + _IP_CSUM, 0xFFFF - _fold(self.ip_sum + total + ip_id))
        udp = ip + IPV4_HLEN
        # UDP_TUNNEL_CSUM: the field holds the pseudo-header sum (length included, not complemented),
        # which the kernel turns into each frame's checksum (net/ipv4/udp_offload.c).
        struct.pack_into("!H", out, udp, sport)  # (a pad byte in a format would zero the port after it)
        struct.pack_into("!HH", out, udp + 4, udp_len, _fold(self.pseudo + udp_len))
        if gso_type & ~VIRTIO_NET_HDR_GSO_ECN == VIRTIO_NET_HDR_GSO_TCPV6:
            struct.pack_into("!H", out, PREFIX_LEN - 2, ETHERTYPE_IPV6)
        else:
            struct.pack_into("!H", out, PREFIX_LEN - 2, ETHERTYPE_IPV4)
        return out
