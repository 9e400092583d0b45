"""Constants of the WireGuard datapath (dataplane/wg_engine.py, wg_rx.py) and how many packets a list of
TUN writes carries."""

from __future__ import annotations

import struct

from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_NONE, VNET_HDR_LEN

BATCH = 64  # TUN reads / datagrams per turn
HEADROOM = 32  # in front of every TUN packet: room for the 10-byte virtio header
FEW = 4  # packets up to which a per-packet Python path beats a dozen array operations
MAX_CACHED = 4096  # entries of the source and route caches before they are cleared

_HDR_LEN_GSO_SIZE = struct.Struct("<HH")  # virtio_net_hdr hdr_len and gso_size, at offset 2


def packets_in_writes(writes: list) -> int:
    """How many inner packets a list of TUN writes (virtio header first) carries: a GSO superpacket
    carries ceil(payload / gso_size) segments, anything else one."""
    count = 0
    for iov in writes:
        head = iov[0]
        gso_type = head[1]
        if gso_type == VIRTIO_NET_HDR_GSO_NONE:
            count += 1
            continue
        hdr_len, gso_size = _HDR_LEN_GSO_SIZE.unpack_from(head, 2)
        payload = sum(len(b) for b in iov) - VNET_HDR_LEN - hdr_len
        count += -(-payload // gso_size) if gso_size else 1
    return count
