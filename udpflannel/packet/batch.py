"""PacketBatch: many packets in one 2-D uint8 array, one packet per row, with headroom in front of each.

Packet i is buf[i, offset : offset + lengths[i]]. The headroom lets an encapsulation header (or the 10-byte
virtio_net_hdr) be written in place at buf[i, offset - h : offset] so nothing is copied to prepend it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Rows keep this many spare bytes after the longest packet, so word-wise checksum loops may read past the end.
TAILROOM = 4


def round_up(x: int, to: int) -> int:
    return (x + to - 1) // to * to


@dataclass
class PacketBatch:
    buf: np.ndarray  # uint8 [n, stride]; packet i is buf[i, offset : offset + lengths[i]]
    lengths: np.ndarray  # int32 [n]
    offset: int  # headroom before each packet, so an encapsulation header can be written in place
    n: int
    drop: int = 0  # a DropReason when the whole input was refused (then n == 0), else 0

    @property
    def stride(self) -> int:
        return int(self.buf.shape[1])

    @classmethod
    def empty(cls, n: int, stride: int, offset: int, drop: int = 0) -> PacketBatch:
        return cls(np.zeros((n, stride), np.uint8), np.zeros(n, np.int32), offset, n, drop)

    @classmethod
    def refused(cls, reason: int, offset: int = 0) -> PacketBatch:
        """An empty batch that says why its input was dropped."""
        return cls.empty(0, round_up(offset + TAILROOM, 8), offset, drop=int(reason))

    @classmethod
    def from_packets(
        cls, packets: Iterable[bytes | bytearray | memoryview], headroom: int = 0
    ) -> PacketBatch:
        """Copy packets into a new batch (tests, slow paths)."""
        pkts = [memoryview(p).cast("B") for p in packets]
        longest = max((len(p) for p in pkts), default=0)
        batch = cls.empty(len(pkts), round_up(headroom + longest + TAILROOM, 8), headroom)
        for i, p in enumerate(pkts):
            batch.buf[i, headroom : headroom + len(p)] = np.frombuffer(p, np.uint8)
            batch.lengths[i] = len(p)
        return batch

    def _flat(self) -> memoryview | None:
        if self.buf.flags.c_contiguous:
            return memoryview(self.buf.reshape(-1))
        return None

    def packet(self, i: int) -> memoryview:
        """A view of packet i (no copy)."""
        return self.buf[i, self.offset : self.offset + int(self.lengths[i])].data

    def views(self, head: int = 0) -> list[memoryview]:
        """Views of every packet, each starting `head` bytes into the headroom (for writev/sendmsg iovecs)."""
        flat = self._flat()
        stride, start = self.stride, self.offset - head
        if flat is None:
            return [self.buf[i, start : self.offset + ln].data for i, ln in enumerate(self.lengths.tolist())]
        return [
            flat[i * stride + start : i * stride + self.offset + ln]
            for i, ln in enumerate(self.lengths.tolist())
        ]

    def packets(self) -> list[bytes]:
        """Copies of every packet (tests and slow paths)."""
        return [bytes(v) for v in self.views()]

    def take(self, keep: np.ndarray) -> PacketBatch:
        """A new batch with only the rows where `keep` (bool [n]) is true (copies those rows)."""
        rows = np.flatnonzero(keep)
        return PacketBatch(self.buf[rows], self.lengths[rows], self.offset, len(rows))
