"""A UDP socket opened for the datapath: bound, non-blocking, big buffers, UDP_SEGMENT and UDP_GRO probed
(spec/fastpath.md "UDP"). No numpy: the agent opens the sockets and hands their fds to the datapath workers
(DESIGN.md, memory budget); io/udp.UdpSocket is the same socket with the batched I/O."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Self

from udpflannel.io import linux

_U16 = struct.Struct("=H")


@dataclass
class UdpEndpoint:
    """A bound, non-blocking UDP socket and the offloads the kernel accepted for it. io/udp.UdpSocket adds
    the datapath's sends and receives."""

    sock: socket.socket
    family: int
    gso: bool
    gro: bool
    max_segments: int
    max_payload: int
    recv_slots: int
    headroom: int

    @classmethod
    def open(
        cls,
        family: int,
        bind_addr: str,
        bind_port: int,
        *,
        gso: bool = True,
        gro: bool = True,
        recv_slots: int = 64,
        headroom: int = 16,
        reuse_port: bool = False,
    ) -> Self:
        """Bind and probe. gso/gro are wishes: each is on only if the kernel accepts it and
        UDPFLANNEL_NO_OFFLOAD is not set."""
        if linux.offload_disabled():
            gso = gro = False
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            grow_buffers(sock)
            sock.bind((bind_addr, bind_port))
            sock.setblocking(False)
            gso = gso and _probe_gso(sock)
            gro = gro and _try_setsockopt(sock, linux.SOL_UDP, linux.UDP_GRO, 1)
        except OSError:
            sock.close()
            raise
        max_payload = linux.UDP_MAX_PAYLOAD_V4 if family == socket.AF_INET else linux.UDP_MAX_PAYLOAD_V6
        max_segments = probe_max_segments(family) if gso else 1
        return cls(sock, family, gso, gro, max_segments, max_payload, recv_slots, headroom)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    @property
    def offloads(self) -> list[str]:
        return (["gso"] if self.gso else []) + (["gro"] if self.gro else [])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def grow_buffers(sock: socket.socket, size: int = linux.SOCKET_BUFFER) -> None:
    """SO_*BUF up to the sysctl limit, then SO_*BUFFORCE past it when we are root."""
    for opt, force in ((socket.SO_RCVBUF, linux.SO_RCVBUFFORCE), (socket.SO_SNDBUF, linux.SO_SNDBUFFORCE)):
        sock.setsockopt(socket.SOL_SOCKET, opt, size)
        _try_setsockopt(sock, socket.SOL_SOCKET, force, size)


def _try_setsockopt(sock: socket.socket, level: int, opt: int, value: int) -> bool:
    try:
        sock.setsockopt(level, opt, value)
    except OSError:
        return False
    return True


def _probe_gso(sock: socket.socket) -> bool:
    """UDP_SEGMENT is known to the kernel when getsockopt on it works."""
    try:
        sock.getsockopt(linux.SOL_UDP, linux.UDP_SEGMENT)
    except OSError:
        return False
    return True


def probe_max_segments(family: int) -> int:
    """The kernel's UDP_MAX_SEGMENTS, found by one GSO send of 1-byte segments to a socket of our own on
    loopback (128 on Linux 6.10+, 64 before). Falls back to the smaller value when loopback is unusable."""
    local = "127.0.0.1" if family == socket.AF_INET else "::1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as rx, socket.socket(family, socket.SOCK_DGRAM) as tx:
            rx.bind((local, 0))
            dest = rx.getsockname()[:2]
            for segs in linux.UDP_MAX_SEGMENTS_CANDIDATES:
                try:
                    tx.sendmsg([bytes(segs)], [(linux.SOL_UDP, linux.UDP_SEGMENT, _U16.pack(1))], 0, dest)
                    return segs
                except OSError:
                    continue
    except OSError:
        pass
    return linux.UDP_MAX_SEGMENTS_CANDIDATES[-1]
