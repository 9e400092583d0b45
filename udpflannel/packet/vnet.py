"""virtio_net_hdr, the 10-byte header the kernel puts in front of every TUN packet when IFF_VNET_HDR is on.

Mirrors `struct virtio_net_hdr` in include/uapi/linux/virtio_net.h (little-endian on x86-64)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

VNET_HDR_LEN = 10
VNET_HDR_STRUCT = struct.Struct("<BBHHHH")
VNET_HDR_DTYPE = np.dtype(
    [
        ("flags", "u1"),
        ("gso_type", "u1"),
        ("hdr_len", "<u2"),
        ("gso_size", "<u2"),
        ("csum_start", "<u2"),
        ("csum_offset", "<u2"),
    ]
)

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM = 8  # UDP-tunnel GSO: the outer UDP checksums too (the tunnel TAP)

VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3  # UFO (IP fragmentation): we never enable it
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5  # USO
VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 = 0x20  # or'ed to the inner type, over an IPv4 outer header (6.17+)
VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6 = 0x40  # the same over an IPv6 outer header
VIRTIO_NET_HDR_GSO_ECN = 0x80

ZERO_VNET_HDR = bytes(VNET_HDR_LEN)


@dataclass(frozen=True, slots=True)
class VnetHdr:
    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> VnetHdr:
        """Decode the first 10 bytes; the caller checks there are at least 10."""
        return cls(*VNET_HDR_STRUCT.unpack_from(data, 0))

    def encode(self) -> bytes:
        return VNET_HDR_STRUCT.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset
        )

    @property
    def gso_kind(self) -> int:
        """gso_type without the ECN bit."""
        return self.gso_type & ~VIRTIO_NET_HDR_GSO_ECN

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)
