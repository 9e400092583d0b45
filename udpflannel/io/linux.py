"""Linux constants for TUN and UDP offloads that Python 3.11's socket module does not name (x86-64 ABI).

Values from include/uapi/linux/if_tun.h, linux/udp.h and asm-generic/socket.h; spec/fastpath.md lists them."""

from __future__ import annotations

import os

# TUN device (if_tun.h)
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16

# The TX tunnel TAP (io/tunnel_tap.py): UDP-tunnel GSO on TAP devices, Linux 6.17+
IFF_TAP = 0x0002
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_UDP_TUNNEL_GSO = 0x080
TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100
TUN_VNET_TNL_HDR_LEN = 24  # its virtio header: virtio_net_hdr_v1 (12), hash (8), two tunnel offsets
# Link flags and address by ioctl (linux/sockios.h, if.h)
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20  # Linux 6.2+
TUN_F_USO6 = 0x40

TUN_OFFLOAD_NAMES = {
    TUN_F_CSUM: "csum",
    TUN_F_TSO4: "tso4",
    TUN_F_TSO6: "tso6",
    TUN_F_TSO_ECN: "tso_ecn",
    TUN_F_USO4: "uso4",
    TUN_F_USO6: "uso6",
}

# Tried in this order: the first one the kernel accepts wins.
TUN_OFFLOAD_STEPS = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    TUN_F_CSUM,
    0,
)

# UDP (linux/udp.h) and socket options (asm-generic/socket.h)
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOCKET_BUFFER = 7 << 20  # spec/fastpath.md: ~7 MiB
MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20

UDP_MAX_PAYLOAD_V4 = 65507  # 65535 - 20 (IPv4) - 8 (UDP)
UDP_MAX_PAYLOAD_V6 = 65527  # 65535 payload length - 8 (UDP)
UDP_MAX_SEGMENTS_CANDIDATES = (128, 64)  # UDP_MAX_SEGMENTS: 128 since Linux 6.10 (probed), 64 before

NO_OFFLOAD_ENV = "UDPFLANNEL_NO_OFFLOAD"
TX_TUNNEL_ENV = "UDPFLANNEL_TX_TUNNEL"
ACK_FILTER_ENV = "UDPFLANNEL_ACK_FILTER"


def _env_says(name: str, words: tuple[str, ...]) -> bool:
    """The environment variable `name` holds one of `words` (case and surrounding blanks ignored)."""
    return os.environ.get(name, "").strip().lower() in words


_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def offload_disabled() -> bool:
    """UDPFLANNEL_NO_OFFLOAD=1 forces the per-packet path everywhere (no vnet header, no GSO/GRO)."""
    return _env_says(NO_OFFLOAD_ENV, _ON)


def tx_tunnel_disabled() -> bool:
    """UDPFLANNEL_TX_TUNNEL=0 keeps superpackets on the userspace split path (io/tunnel_tap.py)."""
    return _env_says(TX_TUNNEL_ENV, _OFF)


def ack_filter_disabled() -> bool:
    """UDPFLANNEL_ACK_FILTER=0 sends every ACK a pod sends (packet/ack_filter.py)."""
    return _env_says(ACK_FILTER_ENV, _OFF)


def offload_names(flags: int) -> list[str]:
    return [name for bit, name in TUN_OFFLOAD_NAMES.items() if flags & bit]
