"""The TX tunnel TAP: each write is one whole TCP (or UDP) superpacket wrapped for the wire (VXLAN, or
flannel's udp format) in outer UDP, IPv4 and Ethernet, behind a virtio header asking for UDP-tunnel GSO
(codec/tunnel_gso.py). The kernel takes it in as a frame from the TAP, forwards it to the peer like a router
(route, neighbour, FORWARD chain) and cuts it into wire-size frames, every inner and outer checksum computed
in C. That replaces the userspace split of the superpacket (packet/gso.py) and its UDP_SEGMENT send, about
half of a sending worker's CPU.

Linux 6.17 added the offload (TUN_F_UDP_TUNNEL_GSO); it needs a TAP, as the kernel checks the offsets
against an outer Ethernet header. The TAP is not persistent, so it goes when the last fd closes. The frames
carry our own underlay address as source, so the TAP accepts local sources and forwards (its own sysctls,
not the host's ip_forward); reverse path filtering on all devices (net.ipv4.conf.all.rp_filter, 0 by
default) would drop them, so then the path stays off. Frames to peers over the IPv6 underlay take it too
when asked for (dual-stack nodes): the TAP then has IPv6 on, with no address of its own, and the kernel
forwards IPv6 only when net.ipv6.conf.all.forwarding is 1, which Kubernetes nodes have. No numpy:
the agent opens it and hands the fd to the datapath workers, like the TUN."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from udpflannel.io import linux

SUFFIX = "-tx"
OFFLOAD = (
    linux.TUN_F_CSUM
    | linux.TUN_F_TSO4
    | linux.TUN_F_TSO6
    | linux.TUN_F_UDP_TUNNEL_GSO
    | linux.TUN_F_UDP_TUNNEL_GSO_CSUM
)
# (sysctl under net/ipv4/conf/<tap>/, value): forward what comes in, from our own address too, unfiltered
SYSCTLS = (("forwarding", "1"), ("accept_local", "1"), ("rp_filter", "0"))
# (under net/ipv6/conf/<tap>/): no address (so it sends nothing: no DAD, no router solicitations), then on
SYSCTLS_V6 = (("addr_gen_mode", "1"), ("accept_ra", "0"), ("forwarding", "1"), ("disable_ipv6", "0"))
PROC_CONF = Path("/proc/sys/net")


def tap_name(tun_name: str) -> str:
    """The TAP's name: the TUN's with SUFFIX (flannel.1 -> flannel.1-tx), cut to fit IFNAMSIZ."""
    return tun_name[: linux.IFNAMSIZ - 1 - len(SUFFIX)] + SUFFIX


@dataclass
class TunnelTap:
    name: str
    fd: int
    mac: bytes
    ipv6: bool = False  # frames with an IPv6 outer header are forwarded too
    why_not_ipv6: str = ""

    @classmethod
    def open(cls, name: str, *, ipv6: bool = False) -> tuple[TunnelTap | None, str]:
        """(the TAP, "") when the kernel and the host allow the path, else (None, why not). ipv6: for peers
        over the IPv6 underlay too, when the host forwards IPv6 (else the TAP's why_not_ipv6 says why)."""
        if linux.offload_disabled() or linux.tx_tunnel_disabled():
            return None, f"turned off ({linux.NO_OFFLOAD_ENV} or {linux.TX_TUNNEL_ENV})"
        rpf = _read_sysctl("ipv4/conf/all/rp_filter")
        if rpf not in (None, "0"):
            # The kernel takes the larger of all's and the TAP's value, and any filter drops frames
            # from our own address arriving on a device without an address (__fib_validate_source).
            return None, f"net.ipv4.conf.all.rp_filter={rpf} would drop its frames (it needs 0)"
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        except OSError as exc:
            return None, f"cannot open /dev/net/tun: {exc.strerror}"
        try:
            flags = linux.IFF_TAP | linux.IFF_NO_PI | linux.IFF_VNET_HDR
            fcntl.ioctl(fd, linux.TUNSETIFF, struct.pack("16sH", name.encode(), flags))
            fcntl.ioctl(fd, linux.TUNSETVNETHDRSZ, struct.pack("i", linux.TUN_VNET_TNL_HDR_LEN))
            try:
                fcntl.ioctl(fd, linux.TUNSETOFFLOAD, OFFLOAD)
            except OSError:
                os.close(fd)
                return None, "the kernel has no UDP-tunnel GSO for TAP devices (Linux 6.17+)"
            for key, value in SYSCTLS:
                _write_sysctl(f"ipv4/conf/{name}/{key}", value)
            why_not = _ipv6_forwarding() if ipv6 else "not asked for"
            if not why_not:
                for key, value in SYSCTLS_V6:
                    _write_sysctl(f"ipv6/conf/{name}/{key}", value)
            else:  # nothing is ever read back from the TAP, so it should send nothing either
                with contextlib.suppress(OSError):
                    _write_sysctl(f"ipv6/conf/{name}/disable_ipv6", "1")
            mac = _bring_up(name)
        except OSError as exc:
            os.close(fd)
            return None, f"cannot set up TAP {name}: {exc.strerror or exc}"
        return cls(name, fd, mac, not why_not, why_not), ""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the TAP, not persistent, goes with its last fd
        self.fd = -1


def _ipv6_forwarding() -> str:
    """Why IPv6 frames from the TAP would not be forwarded ("" when they would)."""
    value = _read_sysctl("ipv6/conf/all/forwarding")
    if value is None:
        return "the host has no IPv6"
    return "" if value == "1" else f"net.ipv6.conf.all.forwarding={value} (it needs 1)"


def _read_sysctl(key: str) -> str | None:
    try:
        return (PROC_CONF / key).read_text().strip()
    except OSError:
        return None


def _write_sysctl(key: str, value: str) -> None:
    (PROC_CONF / key).write_text(value)


def _bring_up(name: str) -> bytes:
    """Set the TAP up; its MAC address (frames written to it must be addressed to it). Two ioctls on a
    socket of the current namespace: pyroute2 would add ~13 MB to the agent (host/links.py keeps it in a
    short-lived child)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", name.encode(), 0)
        flags = struct.unpack_from("16xH", fcntl.ioctl(s, linux.SIOCGIFFLAGS, ifr))[0]
        fcntl.ioctl(s, linux.SIOCSIFFLAGS, struct.pack("16sH14x", name.encode(), flags | linux.IFF_UP))
        hwaddr = fcntl.ioctl(s, linux.SIOCGIFHWADDR, ifr)
        return hwaddr[18:24]  # after the name and the sockaddr's family
