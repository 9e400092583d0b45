"""Kernel VXLAN set up exactly as flanneld's vxlan backend sets it up (spec/fastpath.md): the device
(flannel.1, or flannel-v6.1 over an IPv6 underlay) with learning off, and per peer an onlink route via the
peer's VTEP address, a permanent neighbour entry for its VtepMAC and an fdb entry to its PublicIP. The
baseline and the interop peer of the tests, the trace lab and the benchmarks."""

from __future__ import annotations

from udpflannel.lab.netns import Netns

DEVICE = "flannel.1"
DEVICE_V6 = "flannel-v6.1"
VNI = 1
PORT = 8472


def add_device(
    ns: Netns,
    *,
    mac: str,
    local: str,
    address: str,
    dev: str = "eth0",
    name: str = DEVICE,
    mtu: int = 1450,
) -> None:
    """The VXLAN device, up, with our VTEP `address` (a /32, or a /128 for flannel-v6.1) on it."""
    ns.exec("ip", "link", "add", name, "address", mac, "type", "vxlan", "id", str(VNI),
            "local", local, "dev", dev, "dstport", str(PORT), "nolearning")  # fmt: skip
    ns.exec("ip", "link", "set", name, "mtu", str(mtu))
    ns.exec("ip", "addr", "add", address, "dev", name, *(["nodad"] if ":" in address else []))
    ns.exec("ip", "link", "set", name, "up")


def add_peer(ns: Netns, *, subnet: str, vtep: str, mac: str, public_ip: str, name: str = DEVICE) -> None:
    """What flanneld programs when a peer's lease appears: route, neighbour and fdb entry."""
    family = ["-6"] if ":" in subnet else []
    ns.exec("ip", *family, "route", "replace", subnet, "via", vtep, "dev", name, "onlink")
    ns.exec("ip", *family, "neigh", "replace", vtep, "lladdr", mac, "dev", name, "nud", "permanent")
    ns.exec("bridge", "fdb", "replace", mac, "dev", name, "dst", public_ip)


def remove_peer(ns: Netns, *, subnet: str, vtep: str, mac: str, public_ip: str, name: str = DEVICE) -> None:
    """What flanneld removes when a peer's lease goes; entries already gone are no error."""
    family = ["-6"] if ":" in subnet else []
    ns.exec("ip", *family, "route", "del", subnet, check=False)
    ns.exec("ip", *family, "neigh", "del", vtep, "dev", name, check=False)
    ns.exec("bridge", "fdb", "del", mac, "dev", name, "dst", public_ip, check=False)
