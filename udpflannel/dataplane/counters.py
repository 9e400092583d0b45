"""Datapath counters in shared memory: one int64 row per worker process (so no two processes ever write the
same cell), summed by the agent. Names are the /metrics labels; drop reasons are named, never lumped.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from udpflannel.packet.drops import DropReason

# Order is the memory layout: traffic counters, then one drop counter per DropReason (label = metric name).
TRAFFIC_NAMES: tuple[str, ...] = (
    "tx_packets",  # inner packets encapsulated and handed to the kernel
    "tx_bytes",  # inner bytes of those
    "rx_packets",  # inner packets decapsulated and written to the TUN
    "rx_bytes",
    "tx_batches",
    "rx_batches",
    "tx_superpackets",  # TUN reads that carried a GSO superpacket (offloaded path)
    "rx_coalesced_writes",  # TUN writes (each may carry many coalesced segments)
    "tx_send_calls",  # sendmsg/sendmmsg calls (the per-batch cost the offloads save)
    "icmp_sent",  # frag-needed / packet-too-big / unreachable / time-exceeded written back to the TUN
    "peer_updates",
    "rx_joined_runs",  # superpackets that came as two trains (the UDP GSO limit) and went as one write
    "tx_tunnel_writes",  # superpackets the kernel segmented from the tunnel TAP (dataplane/tx_tunnel.py)
    "tx_acks_filtered",  # pure ACKs left out: a later ACK of the flow in the same read (packet/ack_filter.py)
    "rx_acks_filtered",  # the same for a receive: ACKs from a peer not written to the TUN
)
DROP_NAMES: dict[DropReason, str] = {r: f"drop_{r.label}" for r in DropReason if r is not DropReason.NONE}
COUNTER_NAMES: tuple[str, ...] = TRAFFIC_NAMES + tuple(DROP_NAMES.values())
INDEX: dict[str, int] = {name: i for i, name in enumerate(COUNTER_NAMES)}
SLOTS = 64  # room to append names without changing the mapping size
assert len(COUNTER_NAMES) <= SLOTS


class Counters:
    """[workers, SLOTS] int64 cells over a memfd; the fd is passed to each worker process. Workers take
    their row as a numpy array (row); the agent only sums (totals), with a memoryview, so it never loads
    numpy (DESIGN.md, memory budget)."""

    def __init__(self, workers: int, fd: int | None = None) -> None:
        self.workers = workers
        size = workers * SLOTS * 8
        if fd is None:
            fd = os.memfd_create("udpflannel-counters", 0)
            os.ftruncate(fd, size)
        self.fd = fd
        self._map = mmap.mmap(fd, size)
        self._cells: memoryview | None = memoryview(self._map).cast("q")
        self._rows: list = []  # numpy views handed to workers, dropped before the mapping closes

    def row(self, worker: int):  # -> numpy int64 [SLOTS]
        import numpy as np  # the datapath worker's side only

        arr = np.frombuffer(self._map, dtype=np.int64).reshape(self.workers, SLOTS)[worker]
        self._rows.append(arr)
        return arr

    def totals(self) -> dict[str, int]:
        cells = self._cells
        if cells is None:
            return {name: 0 for name in INDEX}
        return {name: sum(cells[w * SLOTS + i] for w in range(self.workers)) for name, i in INDEX.items()}

    def close(self) -> None:
        self._rows.clear()
        if self._cells is not None:
            self._cells.release()
            self._cells = None
        # A view may still be alive somewhere; then the mapping goes away with the process.
        with contextlib.suppress(BufferError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
