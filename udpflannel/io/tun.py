"""Packet I/O on the TUN device (opening and configuring it: io/tun_device.py).

With offloads the kernel hands us superpackets up to 64 KiB behind a 10-byte virtio_net_hdr and accepts
coalesced ones back (spec/fastpath.md "TUN"). Reads and writes are non-blocking, one packet per syscall (TUN
has no batch call); buffers are preallocated."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from udpflannel.io.tun_device import TunDevice, TunStats  # noqa: F401  (TunStats re-exported)
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.vnet import VNET_HDR_DTYPE, VNET_HDR_LEN, ZERO_VNET_HDR, VnetHdr

# A superpacket: 64 KiB of IP packet plus its virtio header.
MAX_READ = 65535 + VNET_HDR_LEN


class Tun(TunDevice):
    """An open TUN device with its packet I/O (the datapath side; numpy). `vnet` says whether every
    read/write carries a virtio_net_hdr."""

    _read_views: tuple[np.ndarray, int, list[list[memoryview]]] | None = None  # read_batch's, per arena

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
        views = self._row_views(arena, start)
        lengths = arena.lengths
        hdr = VNET_HDR_LEN if self.vnet else 0
        n = 0
        drained = False
        for _ in range(2 * count):  # bounded even if the kernel returned nonsense every time
            if n == count:
                break
            try:
                got = os.readv(self.fd, views[n])
            except BlockingIOError:
                drained = True
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
            # (as bytes, then records: half of what a contiguous copy and a structured view cost)
            headers = np.frombuffer(arena.buf[:n, start : arena.offset].tobytes(), VNET_HDR_DTYPE)
        else:
            headers = np.zeros(n, VNET_HDR_DTYPE)
        return TunRead(batch, headers, drained)

    def _row_views(self, arena: PacketBatch, start: int) -> list[list[memoryview]]:
        """Per arena row, the one-iovec list a read takes (from column `start` to the row's end), made
        once per arena: a fresh view of the arena sliced for every read cost more than the read's setup."""
        cached = self._read_views
        if cached is not None and cached[0] is arena.buf and cached[1] == start:
            return cached[2]
        flat = memoryview(arena.buf.reshape(-1))
        stride = arena.stride
        views = [[flat[i * stride + start : (i + 1) * stride]] for i in range(arena.buf.shape[0])]
        self._read_views = (arena.buf, start, views)
        return views

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
    headers: np.ndarray  # VNET_HDR_DTYPE [n], read-only
    drained: bool = False  # the read stopped at an empty queue: nothing is left until poll says so

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
