"""recvmmsg/sendmmsg through ctypes, with the mmsghdr array as a numpy structured array over one arena.

Lengths, names and control buffers are set and read back as array operations; the only per-call Python
work is the syscall itself. Layouts are x86-64 (iovec 16 bytes, msghdr 56, mmsghdr 64; spec/fastpath.md)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import struct

import numpy as np

from udpflannel.io import linux

IOVEC_DTYPE = np.dtype(
    {"names": ["base", "len"], "formats": ["<u8", "<u8"], "offsets": [0, 8], "itemsize": 16}
)
MMSGHDR_DTYPE = np.dtype(
    {
        "names": ["name", "namelen", "iov", "iovlen", "control", "controllen", "flags", "len"],
        "formats": ["<u8", "<u4", "<u8", "<u8", "<u8", "<u8", "<i4", "<u4"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56],
        "itemsize": 64,
    }
)
SOCKADDR_SIZE = 28  # sockaddr_in6, the larger of the two families
CMSG_SPACE = 64  # room for the one cmsg we enable (UDP_GRO: 16-byte header + int, aligned to 24) and slack
CMSG_HDR = struct.Struct("<QiI")  # cmsg_len, cmsg_level, cmsg_type
CMSG_GRO = struct.Struct("<QiIi")  # the same, then the UDP_GRO segment size
_FLAGS_LEN = struct.Struct("<i4xI")  # mmsghdr msg_flags (offset 48) and msg_len (offset 56)
_U64 = struct.Struct("<Q")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int


def encode_sockaddr(family: int, addr: str, port: int) -> bytes:
    """sockaddr_in / sockaddr_in6 bytes, zero-padded to SOCKADDR_SIZE."""
    packed = socket.inet_pton(family, addr)
    if family == socket.AF_INET:
        raw = struct.pack("<H", family) + struct.pack(">H", port) + packed + bytes(8)
    else:
        raw = struct.pack("<H", family) + struct.pack(">HI", port, 0) + packed + bytes(4)
    return raw.ljust(SOCKADDR_SIZE, b"\0")


def decode_sockaddr(raw: bytes | np.ndarray) -> tuple[str, int]:
    b = bytes(raw)
    family = struct.unpack_from("<H", b)[0]
    port = struct.unpack_from(">H", b, 2)[0]
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, b[4:8]), port
    return socket.inet_ntop(socket.AF_INET6, b[8:24]), port


class MmsgArena:
    """`slots` receive (or send) slots of `slot_size` bytes, with their iovecs, names, control buffers and
    mmsghdrs, all in numpy arrays allocated once."""

    def __init__(self, slots: int, slot_size: int, *, control: bool = True) -> None:
        self.slots = slots
        self.slot_size = slot_size
        self.data = np.empty((slots, slot_size), np.uint8)
        self.names = np.zeros((slots, SOCKADDR_SIZE), np.uint8)
        self.control = np.zeros((slots, CMSG_SPACE), np.uint8)
        self.iov = np.zeros(slots, IOVEC_DTYPE)
        self.hdrs = np.zeros(slots, MMSGHDR_DTYPE)
        idx = np.arange(slots, dtype=np.uint64)
        self.iov["base"] = np.uint64(self.data.ctypes.data) + idx * np.uint64(slot_size)
        self.iov["len"] = slot_size
        self.hdrs["name"] = np.uint64(self.names.ctypes.data) + idx * np.uint64(SOCKADDR_SIZE)
        self.hdrs["iov"] = np.uint64(self.iov.ctypes.data) + idx * np.uint64(IOVEC_DTYPE.itemsize)
        self.hdrs["iovlen"] = 1
        if control:
            self.hdrs["control"] = np.uint64(self.control.ctypes.data) + idx * np.uint64(CMSG_SPACE)
        # Byte views of the headers and control buffers, for reading one message's fields with struct
        # (cheaper than array operations when a call returned a single message).
        self.hdr_bytes = memoryview(self.hdrs.view(np.uint8))
        self.control_bytes = memoryview(self.control.reshape(-1))
        self._hdrs_at = self.hdrs.ctypes.data
        # Every header as a receive wants it; the kernel changes the name and control lengths, flags and
        # length of the ones it fills, and the next receive copies those back from here (one slice copy:
        # ~0.3 us, where resetting the three fields as arrays cost ~1.2).
        self.hdrs["namelen"] = SOCKADDR_SIZE
        self.hdrs["controllen"] = CMSG_SPACE if control else 0
        self._fresh = memoryview(self.hdr_bytes.tobytes())
        # Slot 0 and its sockaddr as memoryviews, for a receive of one datagram read without arrays.
        self.first_slot = memoryview(self.data[0])
        self.first_name = memoryview(self.names[0])
        self._used = 0  # headers the last receive filled
        self.drained = True  # the last receive took every message that waited (it got fewer than asked)

    def recv(self, fd: int, max_n: int | None = None) -> int:
        """One recvmmsg(MSG_DONTWAIT) into the slots; returns how many messages arrived (0 if none)."""
        n = self.slots if max_n is None else min(max_n, self.slots)
        # The kernel changes only the headers of the messages it returns: reset those of the last call.
        if used := self._used:
            at = used * MMSGHDR_DTYPE.itemsize
            self.hdr_bytes[:at] = self._fresh[:at]
        got = _recvmmsg(fd, self._hdrs_at, n, linux.MSG_DONTWAIT, None)
        self._used = max(got, 0)
        self.drained = got < n
        if got < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            raise OSError(err, os.strerror(err))
        return got

    def slot_rows(self, j0: int, m: int, k: int, s: int, step: int = 1) -> np.ndarray:
        """Read-only [m, k, s] view of slots j0, j0 + step, ... (m of them), each cut into k rows of s bytes
        (the datagrams of UDP_GRO trains of segment size s); k * s must fit a slot."""
        # np.ndarray over the arena (as_strided builds its view in Python: ~3 us more a receive)
        rows = np.ndarray(
            (m, k, s),
            np.uint8,
            buffer=self.data,
            offset=j0 * self.data.strides[0],
            strides=(step * self.data.strides[0], s, 1),
        )
        rows.flags.writeable = False
        return rows

    def first_message(self) -> tuple[int, int, int]:
        """(byte length, msg_flags, UDP_GRO segment size or 0) of message 0, read with struct."""
        return self.message(0)

    def message(self, j: int) -> tuple[int, int, int]:
        """(byte length, msg_flags, UDP_GRO segment size or 0) of message j, read with struct (cheaper
        than array operations for a few messages)."""
        at = j * MMSGHDR_DTYPE.itemsize
        flags, length = _FLAGS_LEN.unpack_from(self.hdr_bytes, at + 48)
        (clen,) = _U64.unpack_from(self.hdr_bytes, at + 40)
        if clen < 20:
            return length, flags, 0
        _, level, ctype, size = CMSG_GRO.unpack_from(self.control_bytes, j * CMSG_SPACE)
        return length, flags, size if (level, ctype) == (linux.SOL_UDP, linux.UDP_GRO) else 0

    def gro_sizes(self, n: int) -> np.ndarray:
        """Per message, the UDP_GRO segment size from its cmsg, or 0 when the message is one datagram."""
        ctl = self.control[:n]
        clen = self.hdrs["controllen"][:n]
        level = ctl[:, 8:12].copy().view("<i4")[:, 0]
        ctype = ctl[:, 12:16].copy().view("<u4")[:, 0]
        size = ctl[:, 16:20].copy().view("<i4")[:, 0]
        ok = (clen >= 20) & (level == linux.SOL_UDP) & (ctype == linux.UDP_GRO)
        return np.where(ok, size, 0).astype(np.int64)


def sendmmsg(fd: int, hdrs: np.ndarray, n: int) -> int:
    """sendmmsg(MSG_DONTWAIT) over the first n entries of an MMSGHDR_DTYPE array. Returns the count sent,
    or -errno when not even the first message went out."""
    got = _sendmmsg(fd, hdrs.ctypes.data, n, linux.MSG_DONTWAIT)
    if got < 0:
        return -ctypes.get_errno()
    return got
