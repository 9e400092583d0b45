"""UDP sockets for the datapath: big buffers, UDP_SEGMENT (GSO) sends and UDP_GRO receives, probed at
start, with a per-datagram fallback (sendmmsg / recvmmsg without GRO) that puts the same bytes on the wire.

Send errors never raise: they are counted (an EIO/EINVAL from a GSO send switches the socket to the
fallback for good, spec/fastpath.md "UDP"). Receives come back as a PacketBatch of datagrams with
headroom, so decapsulation is a slice, plus the source of every datagram."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from udpflannel.io import linux
from udpflannel.io.mmsg import (
    MMSGHDR_DTYPE,
    SOCKADDR_SIZE,
    MmsgArena,
    decode_sockaddr,
    encode_sockaddr,
    sendmmsg,
)
from udpflannel.io.udp_endpoint import (  # noqa: F401  (re-exported)
    UdpEndpoint,
    _probe_gso,
    _try_setsockopt,
    grow_buffers,
    probe_max_segments,
)
from udpflannel.io.udp_recv import LoneDatagram, Received, TrainSet, UdpReceiver
from udpflannel.packet.batch import PacketBatch

Buffer = bytes | bytearray | memoryview
_GSO_GIVE_UP = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT)
_U16 = struct.Struct("=H")
# A UDP_SEGMENT control message: cmsghdr (len, level, type) and the native u16 segment size.
_GSO_CMSG = struct.Struct("=QiiH")
_GSO_CMSG_LEN = 16 + 2
_GSO_CMSG_SPACE = 24  # CMSG_SPACE(2): the data padded to 8 bytes
NAME_CACHE_MAX = 1024  # destinations whose encoded sockaddr is kept


@dataclass
class UdpStats:
    sent: int = 0  # datagrams
    send_calls: int = 0
    send_errors: int = 0  # datagrams the kernel refused (ENOBUFS, EAGAIN, unreachable, ...)
    last_send_errno: int = 0
    gso_fallbacks: int = 0  # times a GSO send failed and the socket switched to per-datagram sends
    received: int = 0
    recv_calls: int = 0
    truncated: int = 0  # datagrams bigger than a receive slot (MSG_TRUNC), dropped
    rests_appended: int = 0  # messages moved behind the train they carry on (udp_recv.append_rests)
    recv_errors: int = 0
    last_recv_errno: int = 0


@dataclass
class UdpSocket(UdpReceiver, UdpEndpoint):
    """A bound, non-blocking UDP socket with probed offloads and the datapath's batched sends and receives.
    Build it with UdpSocket.open(...) (io/udp_endpoint.py), or from an inherited fd in a worker."""

    stats: UdpStats = field(default_factory=UdpStats)
    _arena: MmsgArena | None = None
    _send_hdrs: np.ndarray | None = None
    _send_iov: np.ndarray | None = None
    _gso: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # send_rows_gso's headers, iovecs, cmsg
    _gso_layout: int = 0  # iovecs per message the _gso headers point at (0: not set)
    _gso_name: int = 0  # address of the sockaddr every _gso header names (0: not set)
    _names: dict[tuple[str, int], tuple[bytes, np.ndarray, int]] = field(default_factory=dict)

    # -- sending

    def send_segments(
        self, rows: PacketBatch | Sequence[Buffer], seg_size: int | None, dest: tuple[str, int]
    ) -> int:
        """Send each row as one datagram to dest: with GSO, as few sendmsg(UDP_SEGMENT) calls as the limits
        allow (every row but a call's last must be exactly seg_size long; a row of another length ends a
        call). Rows of a PacketBatch are sent from buf[i, offset : offset + lengths[i]]. Returns the number
        of datagrams the kernel took."""
        views = rows.views() if isinstance(rows, PacketBatch) else [memoryview(r) for r in rows]
        if not views:
            return 0
        if not self.gso:
            return self.sendmmsg_to(views, dest)
        lengths = np.fromiter((len(v) for v in views), np.int64, len(views))
        seg = int(lengths[0]) if seg_size is None else seg_size
        if seg <= 0:
            raise ValueError("seg_size must be positive")
        sent = 0
        for a, b in _gso_calls(lengths, seg, self.max_segments, self.max_payload):
            chunk = views[a:b]
            if b - a == 1:
                sent += self._sendmsg(chunk, (), dest, datagrams=1)
                continue
            n = self._sendmsg(
                chunk, [(linux.SOL_UDP, linux.UDP_SEGMENT, _U16.pack(seg))], dest, datagrams=b - a
            )
            if n < 0:  # GSO refused for good: this chunk and the rest go one datagram at a time
                return sent + self.sendmmsg_to(views[a:], dest)
            sent += n
        return sent

    def send_packed(self, data: Buffer, seg_size: int, dest: tuple[str, int]) -> int:
        """Send `data` cut into datagrams of seg_size bytes (the last may be shorter), e.g. the rows of a
        packed split (packet.gso.packed_payload): one sendmsg(UDP_SEGMENT) per as many datagrams as the
        limits allow, no per-datagram views. Without GSO, one sendmmsg of slices. Returns datagrams sent."""
        mv = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        total = len(mv)
        if seg_size <= 0:
            raise ValueError("seg_size must be positive")
        count = -(-total // seg_size)
        if count == 0:
            return 0
        if not self.gso or count == 1:
            if count == 1:
                return self._sendmsg((mv,), (), dest, datagrams=1)
            return self.sendmmsg_to([mv[a : a + seg_size] for a in range(0, total, seg_size)], dest)
        per_call = max(1, min(self.max_segments, self.max_payload // seg_size)) * seg_size
        if total > per_call:  # e.g. a 64 KiB superpacket: 44 + 3 VXLAN datagrams, two messages, one call
            return self.send_spans(np.frombuffer(mv, np.uint8), [(0, total)], seg_size, dest)
        anc = [(linux.SOL_UDP, linux.UDP_SEGMENT, _U16.pack(seg_size))]
        sent = self._sendmsg((mv,), anc, dest, datagrams=count)
        if sent < 0:  # GSO refused for good: one datagram at a time
            return self.sendmmsg_to([mv[a : a + seg_size] for a in range(0, total, seg_size)], dest)
        return sent

    def send_spans(
        self, data: np.ndarray, spans: list[tuple[int, int]], seg_size: int, dest: tuple[str, int]
    ) -> int:
        """Several packed runs of datagrams in one buffer (span: byte offset and length in `data`, cut into
        datagrams of seg_size bytes, the last one shorter), e.g. the superpackets of one flow split
        together (packet.gso_many): UDP_SEGMENT messages of as many datagrams as the limits allow, all in
        one sendmmsg. A refused message and the rest go through send_packed, which judges and counts
        each (one message a call); without GSO, every span does. Returns the datagrams sent."""
        if not self.gso:
            return sum(self.send_packed(data[a : a + n], seg_size, dest) for a, n in spans)
        per_call = max(1, min(self.max_segments, self.max_payload // seg_size)) * seg_size
        base = data.ctypes.data
        msgs = [(base + a + c, min(per_call, n - c)) for a, n in spans for c in range(0, n, per_call)]
        m = len(msgs)
        _, iov, _ = self._gso_arrays(m, m)
        iov[:m] = msgs  # (address, length): one iovec a message
        got = self._sendmmsg_gso(m, 1, seg_size, dest)
        done = m if got == m else max(got, 0)
        sent = sum(-(-n // seg_size) for _, n in msgs[:done])
        self.stats.sent += sent
        if done < m and got < 0 and -got in _GSO_GIVE_UP:
            self.gso = False
            self.stats.gso_fallbacks += 1
        for a, n in msgs[done:]:
            sent += self.send_packed(data[a - base : a - base + n], seg_size, dest)
        return sent

    def _sendmsg(
        self, bufs: Sequence[Buffer], anc: Sequence, dest: tuple[str, int], *, datagrams: int
    ) -> int:
        """One sendmsg carrying `datagrams` datagrams (several with UDP_SEGMENT). Returns how many went out:
        all or none (a refusal is counted); -1 when a GSO send failed in a way that means GSO cannot work."""
        self.stats.send_calls += 1
        try:
            self.sock.sendmsg(bufs, anc, 0, dest)
        except OSError as exc:
            if anc and exc.errno in _GSO_GIVE_UP:
                self.gso = False
                self.stats.gso_fallbacks += 1
                return -1
            self.stats.send_errors += datagrams
            self.stats.last_send_errno = exc.errno or 0
            return 0
        self.stats.sent += datagrams
        return datagrams

    def send_one(self, datagram: Buffer, dest: tuple[str, int]) -> int:
        """One datagram with one sendto (cheaper than any batch call for a lone packet); 1 if the kernel
        took it, 0 (counted in stats) if not."""
        self.stats.send_calls += 1
        try:
            self.sock.sendto(datagram, dest)
        except OSError as exc:
            self.stats.send_errors += 1
            self.stats.last_send_errno = exc.errno or 0
            return 0
        self.stats.sent += 1
        return 1

    def sendmmsg(self, items: Sequence[tuple[Buffer, tuple[str, int]]]) -> int:
        """Send each (payload, dest) as one datagram with as few sendmmsg calls as possible."""
        if not items:
            return 0
        return self._sendmmsg([p for p, _ in items], [self._name(d)[0] for _, d in items])

    def sendmmsg_to(self, payloads: Sequence[Buffer], dest: tuple[str, int]) -> int:
        """Send each payload as one datagram to one destination (the per-datagram fallback of GSO)."""
        if not payloads:
            return 0
        return self._sendmmsg(payloads, [self._name(dest)[0]] * len(payloads))

    def _name(self, dest: tuple[str, int]) -> tuple[bytes, np.ndarray, int]:
        """dest as a sockaddr: its bytes, a numpy copy the kernel may read, and that copy's address.
        Cached: a node sends to a handful of peers, and encoding costs more than the send's own setup."""
        hit = self._names.get(dest)
        if hit is None:
            if len(self._names) >= NAME_CACHE_MAX:
                self._names.clear()
            raw = encode_sockaddr(self.family, dest[0], dest[1])
            arr = np.frombuffer(raw, np.uint8).copy()
            hit = self._names[dest] = (raw, arr, arr.ctypes.data)
        return hit

    def send_rows(self, buf: np.ndarray, rows: np.ndarray, col: int, lengths: np.ndarray, dest) -> int:
        """Send buf[r, col : col + lengths[i]] for the i-th row r of `rows` as one datagram each to dest,
        with sendmmsg; the iovecs are computed as arrays from the buffer's address (no per-datagram
        Python objects). buf must be C-contiguous. Returns datagrams sent."""
        n = len(rows)
        if n == 0:
            return 0
        hdrs, iov = self._send_arrays(n)
        _, name, name_at = self._name(dest)
        _point_at_rows(iov, buf, rows, col, lengths)
        hdrs["name"][:n] = name_at  # one destination: every message points at the same name
        return self._sendmmsg_prepared(hdrs, iov, n, (buf, name))

    def send_rows_gso(self, buf: np.ndarray, rows: np.ndarray, col: int, seg: int, last: int, dest) -> int:
        """send_rows for rows of seg bytes each (the last one `last` bytes, at most seg) with UDP_SEGMENT:
        each message of one sendmmsg gathers as many rows as the segment and payload limits allow, its
        iovecs computed as arrays (no per-datagram Python objects). Falls back to send_rows (one datagram
        a message) without GSO or if the kernel refuses. buf must be C-contiguous. Returns datagrams sent."""
        n = len(rows)
        lengths = np.full(n, seg, np.int64)
        lengths[-1] = last
        if not self.gso or n < 2:
            return self.send_rows(buf, rows, col, lengths, dest)
        per_call = max(1, min(self.max_segments, self.max_payload // seg))
        m = -(-n // per_call)
        _, iov, _ = self._gso_arrays(n, m)
        _point_at_rows(iov, buf, rows, col, lengths)
        got = self._sendmmsg_gso(n, per_call, seg, dest)
        if got == m:
            self.stats.sent += n
            return n
        # Some message was refused: what went out went out; the rest one datagram a message (which
        # judges and counts each), and GSO off for good when the kernel cannot do it at all.
        done = max(got, 0) * per_call
        if got < 0 and -got in _GSO_GIVE_UP:
            self.gso = False
            self.stats.gso_fallbacks += 1
        self.stats.sent += done
        return done + self.send_rows(buf, rows[done:], col, lengths[done:], dest)

    def _sendmmsg_gso(self, n: int, per_msg: int, seg: int, dest: tuple[str, int]) -> int:
        """One sendmmsg of UDP_SEGMENT messages (datagrams of seg bytes) over the first n iovecs of the
        _gso_arrays iovec array, which the caller filled: message i gathers per_msg of them from iovec
        i * per_msg (the last what is left). Messages sent, or -errno when the first was refused."""
        m = -(-n // per_msg)
        hdrs, iov, control = self._gso_arrays(n, m)
        named = self._name(dest)  # (encoded, array, address): held until the call returns
        # Every header keeps its iovec pointer, count and name until the layout or destination changes
        # (steady traffic: never), so a send sets only what differs: the last message's count.
        if per_msg != self._gso_layout:
            step = np.uint64(iov.strides[0] * per_msg)
            hdrs["iov"] = np.uint64(iov.ctypes.data) + np.arange(len(hdrs), dtype=np.uint64) * step
            hdrs["iovlen"] = per_msg
            self._gso_layout = per_msg
        if named[2] != self._gso_name:
            hdrs["name"] = named[2]
            self._gso_name = named[2]
        rest = n - (m - 1) * per_msg
        counts = hdrs["iovlen"] if rest != per_msg else None
        if counts is not None:
            counts[m - 1] = rest
        _GSO_CMSG.pack_into(control, 0, _GSO_CMSG_LEN, linux.SOL_UDP, linux.UDP_SEGMENT, seg)
        got = self._sendmmsg_raw(hdrs, m)
        if counts is not None:
            counts[m - 1] = per_msg
        return got

    def _sendmmsg_raw(self, hdrs: np.ndarray, m: int) -> int:
        """One sendmmsg over m prepared headers: messages sent, or -errno when the first was refused."""
        self.stats.send_calls += 1
        return sendmmsg(self.sock.fileno(), hdrs, m)

    def _gso_arrays(self, n: int, m: int) -> tuple[np.ndarray, np.ndarray, memoryview]:
        """Header, iovec and control arrays for send_rows_gso: m messages over n iovecs, every message
        carrying the same UDP_SEGMENT control message and the family's name length."""
        if self._gso is None or len(self._gso[1]) < n or len(self._gso[0]) < m:
            hdrs = np.zeros(max(m, 8), MMSGHDR_DTYPE)
            iov = np.zeros((max(n, 64), 2), "<u8")
            control = np.zeros(_GSO_CMSG_SPACE, np.uint8)
            hdrs["control"] = control.ctypes.data
            hdrs["controllen"] = _GSO_CMSG_SPACE
            hdrs["namelen"] = SOCKADDR_SIZE if self.family == socket.AF_INET6 else 16
            self._gso = (hdrs, iov, control)
            self._gso_layout = self._gso_name = 0  # pointers, counts and names are set on first use
        hdrs, iov, control = self._gso
        return hdrs, iov, memoryview(control)

    def _send_arrays(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The mmsghdr and iovec arrays for n messages; each header points at its own iovec (one each)
        and has the family's name length from the start, so a send sets only names and iovecs."""
        if self._send_hdrs is None or len(self._send_hdrs) < n:
            size = max(n, 64)
            hdrs = np.zeros(size, MMSGHDR_DTYPE)
            iov = np.zeros((size, 2), "<u8")
            hdrs["iov"] = iov.ctypes.data + np.arange(size, dtype=np.uint64) * np.uint64(iov.strides[0])
            hdrs["iovlen"] = 1
            hdrs["namelen"] = SOCKADDR_SIZE if self.family == socket.AF_INET6 else 16
            self._send_hdrs, self._send_iov = hdrs, iov
        assert self._send_iov is not None
        return self._send_hdrs, self._send_iov

    def _sendmmsg(self, payloads: Sequence[Buffer], names: Sequence[bytes]) -> int:
        n = len(payloads)
        hdrs, iov = self._send_arrays(n)
        # Keep numpy views of every buffer alive until sendmmsg returns: their addresses go to the kernel.
        arrays = [np.frombuffer(p, np.uint8) for p in payloads]
        name_arr = np.frombuffer(b"".join(names), np.uint8)
        iov[:n, 0] = [a.ctypes.data for a in arrays]
        iov[:n, 1] = [a.size for a in arrays]
        hdrs["name"][:n] = name_arr.ctypes.data + np.arange(n, dtype=np.uint64) * np.uint64(SOCKADDR_SIZE)
        return self._sendmmsg_prepared(hdrs, iov, n, (arrays, name_arr))

    def _sendmmsg_prepared(self, hdrs: np.ndarray, iov: np.ndarray, n: int, keep: object) -> int:
        """sendmmsg over the first n headers once names and iovecs are set; `keep` holds the buffers
        whose addresses the kernel reads, alive until the calls return."""
        ok = 0
        i = 0
        fd = self.sock.fileno()
        while i < n:
            self.stats.send_calls += 1
            got = sendmmsg(fd, hdrs[i:], n - i)
            if got > 0:
                i += got
                ok += got
                continue
            # The first message of the rest was refused: count it, and go on unless the queue is full.
            self.stats.last_send_errno = -got
            if -got in (errno.EAGAIN, errno.ENOBUFS):
                self.stats.send_errors += n - i
                break
            self.stats.send_errors += 1
            i += 1
        del keep
        self.stats.sent += ok
        return ok


def _point_at_rows(iov: np.ndarray, buf: np.ndarray, rows: np.ndarray, col: int, lengths: np.ndarray) -> None:
    """iovecs [n, 2] for buf[r, col : col + lengths[i]], r = rows[i], computed from the buffer's address."""
    if not buf.flags.c_contiguous:
        raise ValueError("sending rows needs a C-contiguous buffer")
    n = len(rows)
    iov[:n, 0] = np.uint64(buf.ctypes.data + col) + rows.astype(np.uint64) * np.uint64(buf.strides[0])
    iov[:n, 1] = lengths


def _gso_calls(lengths: np.ndarray, seg: int, max_segments: int, max_payload: int) -> list[tuple[int, int]]:
    """Row ranges [a, b) for one UDP_SEGMENT sendmsg each: rows of exactly seg bytes, at most one shorter
    row at the end of a call, a row longer than seg alone, and the segment and payload limits respected."""
    per_call = max(1, min(max_segments, max_payload // seg))
    n = len(lengths)
    # A call must end after any row that is not exactly seg long.
    ends = np.flatnonzero(lengths != seg).tolist()
    calls: list[tuple[int, int]] = []
    a = 0
    for e in [*ends, n - 1]:
        if e < a:
            continue
        stop = e + 1
        if lengths[e] > seg and e > a:
            # a longer row cannot follow equal ones in one call: send it on its own
            _chunk(calls, a, e, per_call)
            calls.append((e, e + 1))
        else:
            _chunk(calls, a, stop, per_call)
        a = stop
    return calls


def _chunk(calls: list[tuple[int, int]], a: int, b: int, per_call: int) -> None:
    for s in range(a, b, per_call):
        calls.append((s, min(s + per_call, b)))


__all__ = [
    "LoneDatagram",
    "Received",
    "TrainSet",
    "UdpSocket",
    "UdpStats",
    "decode_sockaddr",
    "grow_buffers",
    "probe_max_segments",
]
