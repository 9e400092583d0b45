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
from udpflannel.packet.batch import PacketBatch, round_up

Buffer = bytes | bytearray | memoryview
_GSO_GIVE_UP = (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT)
_U16 = struct.Struct("=H")
TRAIN_MIN = 2  # recv_trains: GRO messages of at least this many datagrams are passed on as zero-copy views
ARENA_SLACK = 4096  # receive slots are 64 KiB + this, so k * segment size of any train fits the slot


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
    recv_errors: int = 0
    last_recv_errno: int = 0


@dataclass
class Received:
    """A receive batch: datagram i is batch row i; it came from src_addr[i]:src_port[i]."""

    batch: PacketBatch
    src_addr: np.ndarray  # uint8 [n, 4] (IPv4) or [n, 16] (IPv6), network order
    src_port: np.ndarray  # uint16 [n]
    family: int

    def source(self, i: int) -> tuple[str, int]:
        return socket.inet_ntop(self.family, self.src_addr[i].tobytes()), int(self.src_port[i])

    def sources(self) -> list[str]:
        """Source addresses as strings, one per datagram (the peer table is keyed by PublicIP)."""
        # One string per distinct address (trains share it), then expanded by index.
        if self.batch.n == 0:
            return []
        uniq, inverse = np.unique(self.src_addr, axis=0, return_inverse=True)
        names = [socket.inet_ntop(self.family, u.tobytes()) for u in uniq]
        return [names[j] for j in inverse.reshape(-1).tolist()]


@dataclass
class UdpSocket:
    """A bound, non-blocking UDP socket with probed offloads. Build it with UdpSocket.open(...)."""

    sock: socket.socket
    family: int
    gso: bool
    gro: bool
    max_segments: int
    max_payload: int
    recv_slots: int
    headroom: int
    stats: UdpStats = field(default_factory=UdpStats)
    _arena: MmsgArena | None = None
    _send_hdrs: np.ndarray | None = None
    _send_iov: np.ndarray | None = None

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
    ) -> UdpSocket:
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

    def __enter__(self) -> UdpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        anc = [(linux.SOL_UDP, linux.UDP_SEGMENT, _U16.pack(seg_size))]
        sent = 0
        for a in range(0, total, per_call):
            chunk = mv[a : a + per_call]
            datagrams = -(-len(chunk) // seg_size)
            n = self._sendmsg((chunk,), anc if datagrams > 1 else (), dest, datagrams=datagrams)
            if n < 0:  # GSO refused for good: the rest goes one datagram at a time
                rest = mv[a:]
                return sent + self.sendmmsg_to(
                    [rest[b : b + seg_size] for b in range(0, len(rest), seg_size)], dest
                )
            sent += n
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

    def sendmmsg(self, items: Sequence[tuple[Buffer, tuple[str, int]]]) -> int:
        """Send each (payload, dest) as one datagram with as few sendmmsg calls as possible."""
        if not items:
            return 0
        names = {d: encode_sockaddr(self.family, d[0], d[1]) for d in {d for _, d in items}}
        return self._sendmmsg([p for p, _ in items], [names[d] for _, d in items])

    def sendmmsg_to(self, payloads: Sequence[Buffer], dest: tuple[str, int]) -> int:
        """Send each payload as one datagram to one destination (the per-datagram fallback of GSO)."""
        if not payloads:
            return 0
        return self._sendmmsg(payloads, [encode_sockaddr(self.family, dest[0], dest[1])] * len(payloads))

    def send_rows(self, buf: np.ndarray, rows: np.ndarray, col: int, lengths: np.ndarray, dest) -> int:
        """Send buf[r, col : col + lengths[i]] for the i-th row r of `rows` as one datagram each to dest,
        with sendmmsg; the iovecs are computed as arrays from the buffer's address (no per-datagram
        Python objects). buf must be C-contiguous. Returns datagrams sent."""
        n = len(rows)
        if n == 0:
            return 0
        if not buf.flags.c_contiguous:
            raise ValueError("send_rows needs a C-contiguous buffer")
        hdrs, iov = self._send_arrays(n)
        name = np.frombuffer(encode_sockaddr(self.family, dest[0], dest[1]), np.uint8)
        stride = np.uint64(buf.strides[0])
        iov[:n, 0] = np.uint64(buf.ctypes.data + col) + rows.astype(np.uint64) * stride
        iov[:n, 1] = lengths
        hdrs["name"][:n] = name.ctypes.data  # one destination: every message points at the same name
        return self._sendmmsg_prepared(hdrs, iov, n, (buf, name))

    def _send_arrays(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._send_hdrs is None or len(self._send_hdrs) < n:
            size = max(n, 64)
            self._send_hdrs = np.zeros(size, MMSGHDR_DTYPE)
            self._send_iov = np.zeros((size, 2), "<u8")
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
        hdrs["namelen"][:n] = SOCKADDR_SIZE if self.family == socket.AF_INET6 else 16
        hdrs["iov"][:n] = iov.ctypes.data + np.arange(n, dtype=np.uint64) * np.uint64(16)
        hdrs["iovlen"][:n] = 1
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

    # -- receiving

    def _recv(self, max_messages: int | None) -> tuple[MmsgArena, int]:
        if self._arena is None:
            # A datagram may be up to 64 KiB even without GRO; pages are touched only when used. The slack
            # lets a train's last, shorter datagram be a full row of a zero-copy view (recv_trains).
            self._arena = MmsgArena(self.recv_slots, 65536 + ARENA_SLACK)
        arena = self._arena
        try:
            m = arena.recv(self.sock.fileno(), max_messages)
        except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP error: report, never raise
            self.stats.recv_errors += 1
            self.stats.last_recv_errno = exc.errno or 0
            m = 0
        self.stats.recv_calls += 1
        return arena, m

    def recv_batch(self, max_messages: int | None = None) -> Received:
        """One recvmmsg: every datagram that arrived (UDP_GRO trains split by their segment size), copied
        into the rows of a new PacketBatch at `headroom`, with the source of each. Empty when none wait."""
        arena, m = self._recv(max_messages)
        return self._split_trains(arena, m)

    def recv_trains(self, max_messages: int | None = None) -> list[Received]:
        """One recvmmsg, as batches in arrival order: each UDP_GRO train of at least TRAIN_MIN datagrams
        is a zero-copy view of the receive buffer (its datagrams are the rows of a [k, segment size] array,
        offset 0: a train of equal-size datagrams is a strided 2-D view of one buffer); runs of other
        messages are copied into one batch as recv_batch does. Views are valid until the next receive on
        this socket, so each batch must be consumed before then. [] when nothing waits."""
        arena, m = self._recv(max_messages)
        if m == 0:
            return []
        if m == 1 and self.gro:
            # The usual case under load: one train per call, sized up with struct, no array operations.
            t, flags, s = arena.first_message()
            k = -(-t // s) if 0 < s < t else 0
            if not flags & linux.MSG_TRUNC and k >= TRAIN_MIN and k * s <= arena.slot_size:
                return [self._train_view(arena, 0, k, s, t)]
        shapes = self._shapes(arena, m)
        total, seg, counts = shapes
        out: list[Received] = []
        pending: list[int] = []
        for j, (k, s, t) in enumerate(zip(counts.tolist(), seg.tolist(), total.tolist(), strict=True)):
            if k >= TRAIN_MIN and k * s <= arena.slot_size:
                if pending:
                    out.append(self._split_trains(arena, m, np.array(pending), shapes))
                    pending = []
                out.append(self._train_view(arena, j, k, s, t))
            elif k:
                pending.append(j)
        if pending:
            out.append(self._split_trains(arena, m, np.array(pending), shapes))
        return out

    def _addr_cols(self) -> tuple[int, int]:
        """(offset, length) of the address in a sockaddr of our family."""
        return (4, 4) if self.family == socket.AF_INET else (8, 16)

    def _train_view(self, arena: MmsgArena, j: int, k: int, s: int, t: int) -> Received:
        aoff, alen = self._addr_cols()
        lengths = np.empty(k, np.int32)
        lengths.fill(s)
        lengths[-1] = t - (k - 1) * s
        batch = PacketBatch(arena.data[j, : k * s].reshape(k, s), lengths, 0, k)
        names = arena.names
        # One source for every row: a [k, alen] view with row stride 0 over the message's sockaddr.
        at = j * names.strides[0] + aoff
        src_addr = np.ndarray((k, alen), np.uint8, buffer=names, offset=at, strides=(0, 1))
        port = np.empty(k, np.uint16)
        port.fill((int(names[j, 2]) << 8) | int(names[j, 3]))
        self.stats.received += k
        return Received(batch, src_addr, port, self.family)

    def _shapes(self, arena: MmsgArena, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per message: total bytes (0 if truncated), segment size, datagram count."""
        total = arena.hdrs["len"][:m].astype(np.int64)
        trunc = (arena.hdrs["flags"][:m] & linux.MSG_TRUNC) != 0
        if trunc.any():
            self.stats.truncated += int(trunc.sum())
            total = np.where(trunc, 0, total)
        seg = arena.gro_sizes(m) if self.gro else np.zeros(m, np.int64)
        seg = np.where((seg <= 0) | (seg >= total), total, seg)
        counts = np.where(total > 0, -(-total // np.maximum(seg, 1)), 0)
        return total, seg, counts

    def _split_trains(
        self,
        arena: MmsgArena,
        m: int,
        which: np.ndarray | None = None,
        shapes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> Received:
        """Messages [0, m) (or those in `which`) copied into the rows of a new batch at `headroom`;
        `shapes` is _shapes(arena, m) when the caller has it already."""
        aoff, alen = self._addr_cols()
        if m == 0:
            empty = PacketBatch.empty(0, round_up(self.headroom + 8, 8), self.headroom)
            return Received(empty, np.zeros((0, alen), np.uint8), np.zeros(0, np.uint16), self.family)
        total, seg, counts = shapes or self._shapes(arena, m)
        msgs = np.arange(m) if which is None else which
        total, seg, counts = total[msgs], seg[msgs], counts[msgs]
        n = int(counts.sum())
        widest = int(seg.max()) if len(msgs) else 0
        stride = round_up(self.headroom + widest + 8, 64)
        buf = np.empty((n, stride), np.uint8)
        lengths = np.empty(n, np.int32)
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))
        h = self.headroom
        single = counts == 1
        if single.any():
            # Messages of one datagram (no GRO, or small unrelated packets): one gather for all of them.
            one = np.flatnonzero(single)
            width = int(total[one].max())
            buf[first[one], h : h + width] = arena.data[msgs[one], :width]
            lengths[first[one]] = total[one]
        for i in np.flatnonzero(counts > 1).tolist():
            k, s, t, r0 = int(counts[i]), int(seg[i]), int(total[i]), int(first[i])
            data = arena.data[int(msgs[i])]
            full = t // s
            if full:
                buf[r0 : r0 + full, h : h + s] = data[: full * s].reshape(full, s)
                lengths[r0 : r0 + full] = s
            if full < k:
                buf[r0 + full, h : h + t - full * s] = data[full * s : t]
                lengths[r0 + full] = t - full * s
        row_msg = np.repeat(msgs, counts)
        names = arena.names
        src_addr = names[row_msg, aoff : aoff + alen]
        src_port = names[row_msg, 2:4].copy().view(">u2")[:, 0].astype(np.uint16)
        self.stats.received += n
        return Received(PacketBatch(buf, lengths, h, n), src_addr, src_port, self.family)


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


__all__ = ["Received", "UdpSocket", "UdpStats", "decode_sockaddr", "grow_buffers", "probe_max_segments"]
