"""The TUN device: opened with IFF_VNET_HDR and TUNSETOFFLOAD when the kernel allows, plain mode otherwise.

With offloads the kernel hands us superpackets up to 64 KiB behind a 10-byte virtio_net_hdr and accepts
coalesced ones back (spec/fastpath.md "TUN"). Reads and writes are non-blocking, one packet per syscall (TUN
has no batch call); buffers are preallocated. Configuration (MTU, addresses, up) goes through pyroute2,
imported only there, so datapath workers that receive a file descriptor never load it."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from udpflannel.io import linux
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.vnet import VNET_HDR_DTYPE, VNET_HDR_LEN, ZERO_VNET_HDR, VnetHdr

# A superpacket: 64 KiB of IP packet plus its virtio header.
MAX_READ = 65535 + VNET_HDR_LEN


@dataclass
class TunStats:
    reads: int = 0
    read_errors: int = 0
    last_read_errno: int = 0
    writes: int = 0
    write_errors: int = 0
    last_write_errno: int = 0


@dataclass
class Tun:
    """An open TUN device. `vnet` says whether every read/write carries a virtio_net_hdr."""

    name: str
    fd: int
    vnet: bool
    offload_flags: int = 0
    stats: TunStats = field(default_factory=TunStats)
    _owner: object = None  # the pytun device object, kept alive so the fd stays open

    @classmethod
    def open(cls, name: str, *, offload: bool | None = None) -> Tun:
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
    def from_fd(cls, fd: int, name: str, *, vnet: bool, offload_flags: int = 0) -> Tun:
        """Wrap a TUN fd opened elsewhere (a datapath worker gets it from the parent)."""
        return cls(name=name, fd=fd, vnet=vnet, offload_flags=offload_flags)

    @property
    def offloads(self) -> list[str]:
        """Active offloads, for the agent's log line (e.g. ['vnet_hdr', 'csum', 'tso4', 'tso6'])."""
        return (["vnet_hdr"] if self.vnet else []) + linux.offload_names(self.offload_flags)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self._owner is not None:
            self._owner.close()  # type: ignore[attr-defined]
            self._owner = None
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Tun:
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

    def read_into(self, buf: memoryview | bytearray | np.ndarray) -> int:
        """One read into `buf` (virtio header first when vnet): the byte count, 0 when nothing waits."""
        try:
            n = os.readv(self.fd, [buf])
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.stats.read_errors += 1
            self.stats.last_read_errno = exc.errno or 0
            return 0
        self.stats.reads += 1
        return n

    def read_batch(self, max_packets: int, headroom: int, arena: PacketBatch | None = None) -> TunRead:
        """Up to max_packets reads (until the queue is empty) into the rows of a preallocated arena: the
        packet at buf[i, headroom:], its virtio header (if any) at buf[i, headroom-10:headroom]."""
        if arena is None:
            arena = new_read_arena(max_packets, headroom)
        if arena.offset < VNET_HDR_LEN and self.vnet:
            raise ValueError("the read arena needs at least 10 bytes of headroom for the virtio header")
        start = arena.offset - VNET_HDR_LEN if self.vnet else arena.offset
        count = min(max_packets, arena.buf.shape[0])
        flat = memoryview(arena.buf.reshape(-1))
        stride = arena.stride
        lengths = arena.lengths
        hdr = VNET_HDR_LEN if self.vnet else 0
        n = 0
        for _ in range(2 * count):  # bounded even if the kernel returned nonsense every time
            if n == count:
                break
            try:
                got = os.readv(self.fd, [flat[n * stride + start : (n + 1) * stride]])
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. the device went away: report it, keep what we have
                self.stats.read_errors += 1
                self.stats.last_read_errno = exc.errno or 0
                break
            if got <= hdr:
                continue  # nothing a packet could be; the kernel never does this
            lengths[n] = got - hdr
            n += 1
        self.stats.reads += n
        batch = PacketBatch(arena.buf[:n], lengths[:n], arena.offset, n)
        if self.vnet:
            raw = np.ascontiguousarray(arena.buf[:n, start : arena.offset])
            headers = raw.view(VNET_HDR_DTYPE).reshape(n)
        else:
            headers = np.zeros(n, VNET_HDR_DTYPE)
        return TunRead(batch, headers)

    # -- writing

    def write(self, data: bytes | memoryview) -> bool:
        """Write one packet (with its virtio header when vnet). False when the kernel refused it."""
        return self.writev((data,))

    def writev(self, iov: Sequence[bytes | memoryview]) -> bool:
        try:
            os.writev(self.fd, iov)
        except OSError as exc:
            self.stats.write_errors += 1
            self.stats.last_write_errno = exc.errno or 0
            return False
        self.stats.writes += 1
        return True

    def write_batch(self, writes: Iterable[Sequence[bytes | memoryview]]) -> int:
        """Write each tuple of buffers as one packet (the output of packet.gro.coalesce). Returns how many
        the kernel took; refusals are counted in stats, never raised."""
        fd = self.fd
        ok = 0
        errors = 0
        writev = os.writev
        for iov in writes:
            try:
                writev(fd, iov)
                ok += 1
            except OSError as exc:
                errors += 1
                self.stats.last_write_errno = exc.errno or 0
        self.stats.writes += ok
        self.stats.write_errors += errors
        return ok

    def write_plain(self, packet: bytes | memoryview) -> bool:
        """Write one bare IP packet whatever the mode (a zero virtio header is added when vnet)."""
        return self.writev((ZERO_VNET_HDR, packet) if self.vnet else (packet,))


@dataclass
class TunRead:
    """What one read_batch returned: packets as batch rows and their virtio headers (zeros in plain mode)."""

    batch: PacketBatch
    headers: np.ndarray  # VNET_HDR_DTYPE [n]

    def needs_split(self) -> np.ndarray:
        """Rows that are superpackets or carry a partial checksum (packet.gso.split_superpacket them)."""
        return (self.headers["gso_type"] != 0) | ((self.headers["flags"] & 1) != 0)

    def header(self, i: int) -> VnetHdr:
        return VnetHdr(*(int(x) for x in self.headers[i].tolist()))


def new_read_arena(max_packets: int, headroom: int, max_read: int = MAX_READ) -> PacketBatch:
    """Preallocated rows for read_batch. Pages are only touched when a big packet lands in them."""
    stride = headroom + max_read + 8
    stride += -stride % 64
    return PacketBatch(
        np.empty((max_packets, stride), np.uint8), np.zeros(max_packets, np.int32), headroom, 0
    )


def _set_offload(fd: int) -> int:
    """TUNSETOFFLOAD with the richest flag set the kernel accepts (USO needs 6.2; then TSO, then CSUM)."""
    for flags in linux.TUN_OFFLOAD_STEPS:
        try:
            fcntl.ioctl(fd, linux.TUNSETOFFLOAD, flags)
            return flags
        except OSError:
            continue
    return 0
