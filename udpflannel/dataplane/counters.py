"""Datapath counters in shared memory: one int64 row per worker process (so no two processes ever write the
same cell), summed by the agent. Names are the /metrics labels; drop reasons are named, never lumped.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import numpy as np

# Order is the memory layout; append only. Drop reasons follow DESIGN.md's naming (the metric label).
COUNTER_NAMES: tuple[str, ...] = (
    "tx_packets",  # inner packets encapsulated and handed to the kernel
    "tx_bytes",  # inner bytes of those
    "rx_packets",  # inner packets decapsulated and written to the TUN
    "rx_bytes",
    "tx_batches",
    "rx_batches",
    "icmp_sent",  # frag-needed / packet-too-big / unreachable / time-exceeded written back to the TUN
    "peer_updates",
    "drop_bad_header",  # malformed outer payload or inner IP header
    "drop_bad_vni",
    "drop_wrong_dst_mac",
    "drop_bad_ethertype",
    "drop_unknown_peer",  # TX: no peer subnet covers the destination
    "drop_not_a_peer_source",  # RX: the outer source is not a known peer's PublicIP
    "drop_too_big",  # larger than the tunnel MTU (answered with ICMP when DF / IPv6)
    "drop_ttl_exceeded",
    "drop_send_error",  # the kernel refused the datagram (ENOBUFS, EMSGSIZE, unreachable, ...)
    "drop_tun_write_error",
    "drop_internal_error",  # a bug caught at the loop boundary: the batch is dropped, the loop goes on
    "drop_no_route",  # udp backend: no peer for the destination of a received packet
)
INDEX: dict[str, int] = {name: i for i, name in enumerate(COUNTER_NAMES)}
SLOTS = 64  # room to append names without changing the mapping size


class Counters:
    """A [workers, SLOTS] int64 array over a memfd; the fd is passed to each worker process."""

    def __init__(self, workers: int, fd: int | None = None) -> None:
        self.workers = workers
        size = workers * SLOTS * 8
        if fd is None:
            fd = os.memfd_create("udpflannel-counters", 0)
            os.ftruncate(fd, size)
        self.fd = fd
        self._map = mmap.mmap(fd, size)
        self.array = np.frombuffer(self._map, dtype=np.int64).reshape(workers, SLOTS)

    def row(self, worker: int) -> np.ndarray:
        return self.array[worker]

    def totals(self) -> dict[str, int]:
        summed = self.array.sum(axis=0)
        return {name: int(summed[i]) for name, i in INDEX.items()}

    def close(self) -> None:
        self.array = np.zeros((0, SLOTS), dtype=np.int64)
        # A view may still be alive somewhere; then the mapping goes away with the process.
        with contextlib.suppress(BufferError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
