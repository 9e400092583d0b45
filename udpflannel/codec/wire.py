"""The backends' wire constants and the MAC text form, without numpy: the control plane (backends, lease
data, trace) needs them and must not load the datapath's numpy (DESIGN.md, memory budget).

The outer IPv4 and UDP headers are the kernel's job (we send through a UDP socket), so what VXLAN writes in
front of an inner IP packet is VXLAN_HEADROOM = 8 + 14 bytes; VXLAN_OVERHEAD (50) is what the MTU loses.
"""

from __future__ import annotations

import struct

# RFC 7348 section 5: flags byte with only the I bit set, 24 reserved bits, 24-bit VNI, 8 reserved bits.
VXLAN_HEADER = struct.Struct("!B3xI")  # flags, then the VNI shifted left by 8 (its low byte reserved)
VXLAN_FLAGS_I = 0x08
VXLAN_PORT = 8472  # Linux's default VXLAN port, flannel's too (not IANA's 4789)
VXLAN_DEFAULT_VNI = 1
VXLAN_HEADER_LEN = 8
ETH_HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
VXLAN_HEADROOM = VXLAN_HEADER_LEN + ETH_HEADER_LEN  # bytes we prepend to an inner IP packet: 22
OUTER_IPV4_UDP_LEN = 20 + 8
OUTER_IPV6_UDP_LEN = 40 + 8
VXLAN_OVERHEAD = OUTER_IPV4_UDP_LEN + VXLAN_HEADROOM  # 50: flannel's vxlan MTU overhead
VXLAN_OVERHEAD_V6 = OUTER_IPV6_UDP_LEN + VXLAN_HEADROOM  # 70: over an IPv6 underlay (flannel-v6.1)
VNI_MAX = (1 << 24) - 1

# flannel's udp backend: the UDP payload is the bare inner IP packet.
UDP_PORT = 8285  # flannel's udp backend default port
UDP_OVERHEAD = 20 + 8  # outer IPv4 + UDP: flannel's udp MTU overhead


def parse_mac(text: str) -> bytes:
    """'02:5a:00:00:00:01' -> 6 bytes; raises ValueError on anything else."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
