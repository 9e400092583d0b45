"""Drop reasons: every packet the datapath refuses is counted under one of these; the lower-case member name
is the /metrics label. Code 0 (NONE) means "keep"; the dataplane adds its own reasons to this one enum.
No numpy here: the agent names its counters from this enum."""

from __future__ import annotations

from enum import IntEnum


class DropReason(IntEnum):
    NONE = 0
    BAD_HEADER = 1  # version, header length or a field that cannot be right
    TRUNCATED = 2  # a length field says more bytes than arrived
    BAD_IP_CHECKSUM = 3
    BAD_L4_CHECKSUM = 4
    UNSUPPORTED_GSO = 5  # a virtio gso_type we never enable (UFO) or a superpacket we cannot split
    TOO_BIG = 6  # does not fit the buffers we were given
    # dataplane/ (engine, vxlan and udp backends); values from 20 up so packet/ can keep adding below them
    UNKNOWN_PEER = 20  # TX: no peer subnet covers the destination (answered with ICMP net unreachable)
    BAD_VNI = 21
    WRONG_DST_MAC = 22  # inner Ethernet destination is not our VtepMAC (kernel flannel.1 drops these too)
    BAD_ETHERTYPE = 23  # inner Ethernet type not IPv4/IPv6, or not matching the inner IP version
    NOT_A_PEER_SOURCE = 24  # RX: the outer source address is not a known peer's PublicIP
    TTL_EXCEEDED = 25  # udp backend: the TTL / hop limit would reach zero on this hop
    OVER_MTU = 26  # TX: longer than the tunnel MTU (answered with frag-needed / packet-too-big when DF)
    SEND_ERROR = 27  # the kernel refused the outer datagram
    TUN_WRITE_ERROR = 28  # the kernel refused the inner packet on the TUN
    INTERNAL_ERROR = 29  # a datapath bug caught at the loop boundary: the batch is dropped, the loop goes on
    NOT_UNICAST = 30  # TX: to a multicast/broadcast address (e.g. the kernel's own MLD reports on the TUN)

    @property
    def label(self) -> str:
        return self.name.lower()
