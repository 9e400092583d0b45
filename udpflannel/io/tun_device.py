"""The TUN device opened and configured: IFF_VNET_HDR and TUNSETOFFLOAD when the kernel allows, plain mode
otherwise (spec/fastpath.md "TUN"). No numpy: the agent opens the device and hands its fd to the datapath
workers (DESIGN.md, memory budget). Configuration (MTU, addresses, up) goes through pyroute2, imported only
there, so datapath workers that receive a file descriptor never load it."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Self

from udpflannel.io import linux


@dataclass
class TunStats:
    reads: int = 0
    read_errors: int = 0
    last_read_errno: int = 0
    writes: int = 0
    write_errors: int = 0
    last_write_errno: int = 0


@dataclass
class TunDevice:
    """An open TUN device: its fd and the offloads the kernel accepted. io/tun.Tun adds the packet I/O."""

    name: str
    fd: int
    vnet: bool
    offload_flags: int = 0
    stats: TunStats = field(default_factory=TunStats)
    _owner: object = None  # the pytun device object, kept alive so the fd stays open

    @classmethod
    def open(cls, name: str, *, offload: bool | None = None) -> Self:
        """Create (or attach to) TUN `name`. offload=None means: unless UDPFLANNEL_NO_OFFLOAD=1."""
        import pytun

        if offload is None:
            offload = not linux.offload_disabled()
        if not 0 < len(name) < linux.IFNAMSIZ:
            raise ValueError(f"bad interface name {name!r}")
        base = pytun.IFF_TUN | pytun.IFF_NO_PI
        dev = None
        vnet = False
        if offload:
            try:
                dev = pytun.TunTapDevice(name=name, flags=base | pytun.IFF_VNET_HDR)
                vnet = True
            except pytun.Error:
                dev = None
        if dev is None:
            dev = pytun.TunTapDevice(name=name, flags=base)
        fd = dev.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        flags = _set_offload(fd) if vnet else 0
        return cls(name=dev.name, fd=fd, vnet=vnet, offload_flags=flags, _owner=dev)

    @classmethod
    def from_fd(cls, fd: int, name: str, *, vnet: bool, offload_flags: int = 0) -> Self:
        """Wrap a TUN fd opened elsewhere (a datapath worker gets it from the parent)."""
        return cls(name=name, fd=fd, vnet=vnet, offload_flags=offload_flags)

    @property
    def offloads(self) -> list[str]:
        """Active offloads, for the agent's log line (e.g. ['vnet_hdr', 'csum', 'tso4', 'tso6'])."""
        return (["vnet_hdr"] if self.vnet else []) + linux.offload_names(self.offload_flags)

    @property
    def uso(self) -> bool:
        """Writes may carry UDP_L4 superpackets (USO for both families, Linux 6.2+)."""
        both = linux.TUN_F_USO4 | linux.TUN_F_USO6
        return self.vnet and self.offload_flags & both == both

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self._owner is not None:
            self._owner.close()  # type: ignore[attr-defined]
            self._owner = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- configuration (control plane; pyroute2 is imported here only)

    def configure(
        self,
        *,
        mtu: int | None = None,
        addresses: Sequence[str] = (),
        up: bool = True,
        txqueuelen: int | None = None,
        gso_max_size: int | None = None,
        netns: str | None = None,
    ) -> None:
        """Set MTU, addresses (CIDR strings) and link state. gso_max_size caps superpackets so one fits a
        single UDP_SEGMENT send (spec/fastpath.md: 61000 for VXLAN); it is best effort on old kernels."""
        from pyroute2 import IPRoute, NetlinkError

        with IPRoute(netns=netns) if netns else IPRoute() as ipr:
            (index,) = ipr.link_lookup(ifname=self.name)
            attrs: dict[str, int] = {}
            if mtu is not None:
                attrs["mtu"] = mtu
            if txqueuelen is not None:
                attrs["txqlen"] = txqueuelen
            if attrs:
                ipr.link("set", index=index, **attrs)
            if gso_max_size is not None:
                # Old kernels refuse to set it from userspace; superpackets are then just sent in chunks.
                with contextlib.suppress(NetlinkError):
                    ipr.link("set", index=index, gso_max_size=gso_max_size)
            for cidr in addresses:
                iface = ipaddress.ip_interface(cidr)
                ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            if up:
                ipr.link("set", index=index, state="up")

    # -- reading


def _set_offload(fd: int) -> int:
    """TUNSETOFFLOAD with the richest flag set the kernel accepts (USO needs 6.2; then TSO, then CSUM)."""
    for flags in linux.TUN_OFFLOAD_STEPS:
        try:
            fcntl.ioctl(fd, linux.TUNSETOFFLOAD, flags)
            return flags
        except OSError:
            continue
    return 0
