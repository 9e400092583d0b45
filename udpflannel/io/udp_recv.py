"""The receiving half of io.udp.UdpSocket: recvmmsg into a numpy arena, UDP_GRO trains split by their
segment size, handed on as zero-copy [k, segment size] views of the arena where they can be, copied into
a batch with headroom where they cannot (spec/fastpath.md "UDP").

UdpReceiver is a mixin of UdpSocket and uses its attributes: sock, family, gro, recv_slots, headroom,
stats, _arena."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from udpflannel.io import linux
from udpflannel.io.mmsg import MmsgArena
from udpflannel.packet.batch import PacketBatch, round_up

TRAIN_MIN = 2  # recv_trains: GRO messages of at least this many datagrams are passed on as zero-copy views
ARENA_SLACK = 4096  # receive slots are 64 KiB + this, so k * segment size of any train fits the slot
SINGLES_MAX = 16  # up to this many one-datagram messages are read with struct and left where they are
# Up to this many messages are sized with struct: ~0.5 us each, where message_shapes' ~20 array
# operations cost ~25 us whatever the count (engine_micro: a receive of one superpacket's two messages).
FEW_MESSAGES = 16
# recv_trains(sets=True) makes a TrainSet of this many consecutive trains or more: checking a set costs ~45
# array operations whatever its size, so two trains cost less alone (engine_micro terms: a receive of two
# superpackets 96 us as two trains, 111 as a set; three 133-135 either way, four 152 as a set).
SET_MIN = 3


@dataclass
class Received:
    """A receive batch: datagram i is batch row i; it came from src_addr[i]:src_port[i]."""

    batch: PacketBatch
    src_addr: np.ndarray  # uint8 [n, 4] (IPv4) or [n, 16] (IPv6), network order
    names: np.ndarray  # uint8 [n, >= 4]: each datagram's sockaddr (its port at bytes 2-3, network order)
    family: int

    @property
    def src_port(self) -> np.ndarray:
        """uint16 [n], made when asked (the datapath judges sources by address alone)."""
        return (self.names[:, 2].astype(np.uint16) << 8) | self.names[:, 3]

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
class TrainSet:
    """Consecutive UDP_GRO trains of one segment size s from one recvmmsg: train j's datagrams are
    rows[j, :counts[j]] of a [m, K, s] view (rows past counts[j] are stale bytes), its last datagram
    lasts[j] bytes long and its row zero past that, from src_addr[j]. train(j) gives train j alone, as
    recv_trains would."""

    rows: np.ndarray
    counts: np.ndarray
    lasts: np.ndarray
    src_addr: np.ndarray  # uint8 [m, 4] or [m, 16]
    family: int
    _views: list[tuple[MmsgArena, int, int, int, int]]
    _sock: UdpReceiver

    def train(self, j: int) -> Received:
        view = self._sock._train_view(*self._views[j])
        self._sock.stats.received -= view.batch.n  # counted once, when the set was made
        return view


@dataclass(slots=True)
class LoneDatagram:
    """The one datagram of a receive (a ping, an ACK at a moderate rate): a view of its receive slot (the
    datagram at its start, `length` bytes) and its source address bytes, for a per-packet path without
    array calls; received() gives it as the Received the batch paths take. Valid until the next receive."""

    row: memoryview
    length: int
    source: bytes  # 4 (IPv4) or 16 bytes
    received: Callable[[], Received]


def append_rests(arena: MmsgArena, total: list[int], seg: list[int], counts: list[int]) -> int:
    """Undo the sender's cut of one superpacket into two UDP_SEGMENT messages (65507 bytes a send: a 64 KiB
    TCP superpacket goes as 44 datagrams and 2-3 more, and the kernel's GRO stops at 64 KiB as well), so
    the receiver checks, coalesces and writes it as the one train it was. A message is moved behind the
    one before it in its receive slot (a copy of its 2-3 datagrams), which then counts it, when that one
    is a GRO train cut at the send limit (another datagram would not have fitted) whose datagrams are all
    full-size, from the same source, with datagrams no larger, and the slot has room. A message that
    is not the rest of the one before it only makes a train the general path splits again. total, seg,
    counts (per message: bytes, segment size, datagrams) are updated in place, the moved message's to 0.
    Returns how many messages were appended."""
    names, data, slot = arena.names, arena.data, arena.slot_size
    moved = 0
    lead = -1  # the train the next message may carry on
    for i in range(len(total)):
        k, t = counts[i], total[i]
        if k == 0:
            lead = -1  # a truncated or empty message between: nothing carries on across it
            continue
        j, lead = lead, i if k >= 2 and t + seg[i] > linux.UDP_MAX_PAYLOAD_V4 else -1
        if j < 0:
            continue
        s, tj = seg[j], total[j]
        if tj % s or (seg[i] != s if k >= 2 else t > s) or tj + t > slot:
            continue
        if names[j].tobytes() != names[i].tobytes():
            continue
        data[j, tj : tj + t] = data[i, :t]
        total[j], counts[j], total[i], counts[i] = tj + t, counts[j] + k, 0, 0
        lead = -1  # a superpacket is two messages at most
        moved += 1
    return moved


class UdpReceiver:
    @property
    def drained(self) -> bool:
        """The last receive took every datagram that waited: nothing is left until poll says so."""
        return self._arena is None or self._arena.drained

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

    def recv_trains(
        self, max_messages: int | None = None, *, sets: bool = False, lone: bool = False
    ) -> list[Received | TrainSet | LoneDatagram]:
        """One recvmmsg, as batches in arrival order: each UDP_GRO train of at least TRAIN_MIN datagrams
        is a zero-copy view of the receive buffer (its datagrams are the rows of a [k, segment size] array,
        offset 0: a train of equal-size datagrams is a strided 2-D view of one buffer); runs of other
        messages are copied into one batch as recv_batch does, but a few one-datagram messages are passed
        on where they lie (offset 0). Views are valid until the next receive on
        this socket, so each batch must be consumed before then. [] when nothing waits. With `sets`,
        SET_MIN or more consecutive trains of one segment size come as one TrainSet instead; with `lone`,
        the one datagram of a receive as a LoneDatagram."""
        arena, m = self._recv(max_messages)
        if m == 0:
            return []
        if m == 1:
            # The usual case under load: one train per call, sized up with struct, no array operations.
            t, flags, s = arena.first_message()
            k = -(-t // s) if 0 < s < t else 0
            if self.gro and not flags & linux.MSG_TRUNC and k >= TRAIN_MIN and k * s <= arena.slot_size:
                return [self._train_view(arena, 0, k, s, t)]
            if lone and not flags & linux.MSG_TRUNC and k == 0:
                aoff, alen = self._addr_cols()
                self.stats.received += 1
                source = arena.first_name[aoff : aoff + alen].tobytes()
                return [
                    LoneDatagram(arena.first_slot, t, source, lambda: self._singles(arena, [t], counted=True))
                ]
        if m <= SINGLES_MAX:
            # A few datagrams of their own (ACKs, pings): each already sits in a row of the arena.
            lengths = []
            for j in range(m):
                t, flags, s = arena.message(j)
                if flags & linux.MSG_TRUNC or 0 < s < t:
                    break
                lengths.append(t)
            else:
                return [self._singles(arena, lengths)]
        total, seg, counts = self.message_shape_lists(arena, m)
        if self.gro and (appended := append_rests(arena, total, seg, counts)):
            self.stats.rests_appended += appended
        shapes: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # arrays, when needed

        def split_pending() -> Received:
            nonlocal shapes
            if shapes is None:
                shapes = (np.array(total, np.int64), np.array(seg, np.int64), np.array(counts, np.int64))
            return self._split_trains(arena, m, np.array(pending), shapes)

        out: list[Received | TrainSet] = []
        pending: list[int] = []
        run: list[tuple[int, int, int, int]] = []  # consecutive trains of one segment size

        def flush_run() -> None:
            if len(run) >= SET_MIN and sets:
                out.append(self._train_set(arena, run))
            else:
                out.extend(self._train_view(arena, j, k, s, t) for j, k, s, t in run)
            run.clear()

        for j, (k, s, t) in enumerate(zip(counts, seg, total, strict=True)):
            if k >= TRAIN_MIN and k * s <= arena.slot_size:
                if pending:
                    out.append(split_pending())
                    pending = []
                # A set's trains lie in evenly spaced slots (every slot, or every other when each
                # superpacket's rest was appended to its first part and left its own slot empty).
                uneven = len(run) >= 2 and j - run[-1][0] != run[1][0] - run[0][0]
                if run and (run[-1][2] != s or uneven):
                    flush_run()
                run.append((j, k, s, t))
            elif k:
                flush_run()
                pending.append(j)
        flush_run()
        if pending:
            out.append(split_pending())
        return out

    def _train_set(self, arena: MmsgArena, run: list[tuple[int, int, int, int]]) -> TrainSet:
        """Trains of one segment size in evenly spaced slots as one [m, K, s] view over those slots."""
        j0, s = run[0][0], run[0][2]
        counts = np.array([k for _, k, _, _ in run], np.int64)
        step = run[1][0] - j0 if len(run) > 1 else 1
        rows = arena.slot_rows(j0, len(run), int(counts.max()), s, step)
        aoff, alen = self._addr_cols()
        src = arena.names[j0 : j0 + step * (len(run) - 1) + 1 : step, aoff : aoff + alen]
        self.stats.received += int(counts.sum())
        lasts = np.array([t - (k - 1) * s for _, k, s, t in run], np.int64)
        data = arena.data
        for j, k, _, t in run:
            data[j, t : k * s] = 0  # the last row past its datagram: checksums sum whole rows
        views = [(arena, j, k, s, t) for j, k, s, t in run]
        return TrainSet(rows, counts, lasts, src, self.family, views, self)

    def _singles(self, arena: MmsgArena, lengths: list[int], *, counted: bool = False) -> Received:
        """Messages 0..m-1, one datagram each, as a zero-copy batch over their receive slots (offset 0),
        valid until the next receive (`counted`: in stats already)."""
        m = len(lengths)
        aoff, alen = self._addr_cols()
        names = arena.names[:m]
        self.stats.received += 0 if counted else m
        batch = PacketBatch(arena.data[:m], np.array(lengths, np.int32), 0, m)
        return Received(batch, names[:, aoff : aoff + alen], names, self.family)

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
        # One source for every row: a [k, sockaddr] view with row stride 0 over the message's sockaddr.
        rows = np.ndarray(
            (k, names.shape[1]), np.uint8, buffer=names, offset=j * names.strides[0], strides=(0, 1)
        )
        self.stats.received += k
        return Received(batch, rows[:, aoff : aoff + alen], rows, self.family)

    def message_shape_lists(self, arena: MmsgArena, m: int) -> tuple[list[int], list[int], list[int]]:
        """message_shapes as lists; a few messages are read with struct, without array operations."""
        if m > FEW_MESSAGES:
            total_a, seg_a, counts_a = self.message_shapes(arena, m)
            return total_a.tolist(), seg_a.tolist(), counts_a.tolist()
        total, seg, counts = [], [], []
        for j in range(m):
            t, flags, s = arena.message(j)
            if flags & linux.MSG_TRUNC:
                self.stats.truncated += 1
                t = 0
            if not self.gro or s <= 0 or s >= t:
                s = t
            total.append(t)
            seg.append(s)
            counts.append(-(-t // s) if t else 0)
        return total, seg, counts

    def message_shapes(self, arena: MmsgArena, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per message of a receive into `arena`: total bytes (0 if truncated, counted in stats), UDP_GRO
        segment size (its length if not a train), datagram count."""
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
        `shapes` is message_shapes(arena, m) when the caller has it already."""
        aoff, alen = self._addr_cols()
        if m == 0:
            empty = PacketBatch.empty(0, round_up(self.headroom + 8, 8), self.headroom)
            return Received(empty, np.zeros((0, alen), np.uint8), np.zeros((0, 4), np.uint8), self.family)
        total, seg, counts = shapes or self.message_shapes(arena, m)
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
        names = arena.names[np.repeat(msgs, counts), : aoff + alen]
        self.stats.received += n
        return Received(PacketBatch(buf, lengths, h, n), names[:, aoff:], names, self.family)
