"""Per-packet I/O for the engine: a plain TUN (no virtio header, one read/write per packet) and UDP sockets
(one recvfrom/sendto per datagram). It is the fallback that always works and the reference the offloaded
path must match on the wire; it fills and drains PacketBatch rows so the engine's batch logic is the same.

Opening devices and sockets happens in the backend (parent); workers get the file descriptors.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

import numpy as np

from udpflannel.packet.batch import PacketBatch

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SOCKET_BUFFER = 7 << 20  # spec/fastpath.md: ~7 MiB socket buffers
SRC_PORT_BASE = 32768  # outer source ports of the per-flow socket pool (Linux's ephemeral range start)


def open_tun(name: str) -> int:
    """Create (or attach to) TUN device `name` in this namespace; returns a non-blocking fd.

    The device lives as long as some process holds the fd (not persistent), so nothing is left behind.
    """
    if not 0 < len(name) < IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def _grow_buffers(sock: socket.socket) -> None:
    for opt, force in ((socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:  # not root: the sysctl limit applies
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)


def open_udp(bind_ip: str, port: int) -> socket.socket:
    """A non-blocking IPv4 UDP socket bound to bind_ip:port with large buffers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _grow_buffers(sock)
        sock.bind((bind_ip, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def open_src_pool(bind_ip: str, size: int, base: int = SRC_PORT_BASE) -> list[socket.socket]:
    """`size` send sockets on consecutive ports from `base` (skipping ports already taken), so each inner flow
    keeps one outer source port as Linux VXLAN does."""
    pool: list[socket.socket] = []
    port = base
    while len(pool) < size and port < 61000:
        try:
            pool.append(open_udp(bind_ip, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                for s in pool:
                    s.close()
                raise
        port += 1
    if not pool:
        raise OSError(errno.EADDRINUSE, f"no free UDP port from {base}")
    return pool


class PlainTun:
    """One read() per packet into batch rows; one write() per packet out."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def read_batch(self, batch: PacketBatch, max_n: int) -> int:
        """Fill rows 0.. of `batch` (lengths set); returns how many packets were read (0 if none waiting)."""
        n = 0
        cap = batch.stride - batch.offset
        while n < max_n:
            try:
                got = os.readv(self.fd, [batch.buf[n, batch.offset : batch.offset + cap]])
            except (BlockingIOError, InterruptedError):
                break
            batch.lengths[n] = got
            n += 1
        batch.n = n
        return n

    def write(self, packet: memoryview | bytes) -> bool:
        try:
            os.write(self.fd, packet)
        except OSError:  # EINVAL for a packet the kernel rejects, EAGAIN when the queue is full
            return False
        return True


class PlainUdp:
    """recvfrom_into per datagram on the receiving socket; sendto per datagram on a pool socket."""

    def __init__(self, rx: socket.socket, pool: list[socket.socket]) -> None:
        self.rx = rx
        self.pool = pool

    def fileno(self) -> int:
        return self.rx.fileno()

    def recv_batch(self, batch: PacketBatch, max_n: int) -> list[str]:
        """Fill rows with datagrams; returns the source IP of each (batch.n set)."""
        sources: list[str] = []
        n = 0
        cap = batch.stride - batch.offset
        while n < max_n:
            try:
                got, addr = self.rx.recvfrom_into(batch.buf[n, batch.offset : batch.offset + cap])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ECONNREFUSED from an ICMP error queued on the socket: not a datagram
                continue
            batch.lengths[n] = got
            sources.append(addr[0])
            n += 1
        batch.n = n
        return sources

    def send(self, sock_index: np.ndarray, views: list[memoryview], dsts: list[tuple[str, int]]) -> int:
        """Send each view to its destination from pool socket sock_index[i]; returns how many failed."""
        failed = 0
        pool = self.pool
        for i, (view, dst) in enumerate(zip(views, dsts, strict=True)):
            try:
                pool[sock_index[i]].sendto(view, dst)
            except OSError:  # ENOBUFS/EAGAIN under load, ENETUNREACH/EMSGSIZE: counted as send errors
                failed += 1
        return failed
