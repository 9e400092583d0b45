"""Socket and TUN helpers of the WireGuard datapath (dataplane/wg_engine.py): a whole peer batch in one
UDP_SEGMENT sendmsg from one buffer, and how many packets a list of TUN writes carries. Refusals are
counted in the socket's stats, never raised."""

from __future__ import annotations

import errno
import struct

import numpy as np

from udpflannel.io import linux
from udpflannel.io.udp import UdpSocket
from udpflannel.packet.vnet import VIRTIO_NET_HDR_GSO_NONE, VNET_HDR_LEN

BATCH = 64  # TUN reads / datagrams per turn
HEADROOM = 32  # in front of every TUN packet: room for the 10-byte virtio header
FEW = 4  # packets up to which a per-packet Python path beats a dozen array operations
MAX_CACHED = 4096  # entries of the source and route caches before they are cleared

# sendmsg errors that mean UDP_SEGMENT cannot work on this socket (as io/udp.py decides for send_segments).
_GSO_GIVE_UP = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT)
_U16 = struct.Struct("=H")
_HDR_LEN_GSO_SIZE = struct.Struct("<HH")  # virtio_net_hdr hdr_len and gso_size, at offset 2


def send_contiguous(udp: UdpSocket, data: np.ndarray, seg: int, dest: tuple[str, int]) -> int:
    """Datagrams of `seg` bytes back to back in `data` (the last may be shorter) to one destination, with
    as few UDP_SEGMENT sendmsg calls as the kernel's limits allow: the whole batch is one iovec, where
    udp.send_segments takes one buffer per datagram. Returns the datagrams the kernel took; refusals are
    counted in udp.stats as send_segments counts them, and a GSO refusal switches the socket to per-datagram
    sends for good."""
    mv = memoryview(data)
    total = len(mv)
    if not udp.gso or total <= seg:
        return udp.send_segments([mv[a : a + seg] for a in range(0, total, seg)], seg, dest)
    step = max(1, min(udp.max_segments, udp.max_payload // seg)) * seg
    anc = [(linux.SOL_UDP, linux.UDP_SEGMENT, _U16.pack(seg))]
    stats = udp.stats
    sent = 0
    for a in range(0, total, step):
        chunk = mv[a : a + step]
        k = -(-len(chunk) // seg)
        stats.send_calls += 1
        try:
            udp.sock.sendmsg([chunk], anc if k > 1 else (), 0, dest)
        except OSError as exc:
            if k > 1 and exc.errno in _GSO_GIVE_UP:
                udp.gso = False
                stats.gso_fallbacks += 1
                rest = [mv[b : b + seg] for b in range(a, total, seg)]
                return sent + udp.send_segments(rest, seg, dest)
            stats.send_errors += k
            stats.last_send_errno = exc.errno or 0
            continue
        stats.sent += k
        sent += k
    return sent


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
