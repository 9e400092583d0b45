"""The receiving half of dataplane.wg_engine.WgEngine: recvmmsg with UDP_GRO into the engine's arena, each
train opened in place (codec/wireguard/rows.open_rows), trains of one receive written back as superpackets
together (packet/gro_trains) or one by one (packet/gro.coalesce), other datagrams opened one by one.

WgReceiver is a mixin of WgEngine and uses its attributes: device, tun, udp, counters, rx_arena, _rx_flat,
rx_views, _sources, _train_out, send_events, _internal_error."""

from __future__ import annotations

import numpy as np

from udpflannel.codec.wireguard import messages as wgm
from udpflannel.codec.wireguard.batch import open_batch
from udpflannel.codec.wireguard.events import Event
from udpflannel.codec.wireguard.rows import OpenedRows, open_rows
from udpflannel.dataplane.wg_io import (
    BATCH,
    FEW,
    HEADROOM,
    MAX_CACHED,
    packets_in_writes,
)
from udpflannel.io.mmsg import decode_sockaddr
from udpflannel.io.udp_recv import append_rests
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gro import coalesce
from udpflannel.packet.gro_acks import ack_run
from udpflannel.packet.gro_trains import MergedTrains, coalesce_trains, out_arena
from udpflannel.packet.gro_udp import udp_run
from udpflannel.packet.vnet import ZERO_VNET_HDR

MIN_TRAIN = 4  # datagrams in a UDP_GRO train from which open_rows beats open_batch
CACHED_MIN_SEGMENT = 512  # trains of smaller datagrams (ACKs) are opened without the view cache
# Trains in the first CACHED_SLOTS arena slots reuse their row views: under load a receive holds 8-16
# trains, and fresh slices cost ~0.7 us a row (--micro with 16 superpackets a round: RX 229 -> 214 us).
# A layout (slot, segment size) of ~50 rows of views is ~22 KB: 2 x CACHED_SLOTS layouts stay < 1 MB.
CACHED_SLOTS = 16


class WgReceiver:
    def rx_once(self, now: float) -> int:
        """One recvmmsg into the receive arena; each UDP_GRO train is opened in place on its strided view
        (open_rows), other datagrams one by one (open_batch). Returns the datagrams received."""
        udp, arena = self.udp, self.rx_arena
        try:
            m = arena.recv(udp.fileno(), BATCH)
        except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP error: report, never raise
            udp.stats.recv_errors += 1
            udp.stats.last_recv_errno = exc.errno or 0
            m = 0
        udp.stats.recv_calls += 1
        if m == 0:
            return 0
        total, seg, counts = udp.message_shape_lists(arena, m)
        if m > 1 and udp.gro:
            # A superpacket's two messages as one train.
            self.counters.joined_runs += append_rests(arena, total, seg, counts)
        n = sum(counts)
        udp.stats.received += n
        try:
            self._receive(m, total, seg, counts, now)
        except Exception:  # a bug must not stop the datapath: drop the batch, count it
            self._internal_error(n)
        return n

    def _receive(self, m: int, total: list[int], seg: list[int], counts: list[int], now: float) -> None:
        arena, slot = self.rx_arena, self.rx_arena.slot_size
        flat = self._rx_flat
        pending: list[tuple[memoryview, tuple]] = []  # datagrams for the one-by-one path, in arrival order
        trains: list[tuple[int, int, int, OpenedRows]] = []  # opened trains (slot, k, s), not yet written
        for j in range(m):
            t, s, k = total[j], seg[j], counts[j]
            if k == 0:
                continue
            src = self._source(j)
            if k >= MIN_TRAIN and k * s <= slot:
                # Flush what came before first, so one flow's packets keep their order.
                self._open_views(pending, now)
                pending = []
                rows = arena.data[j, : k * s].reshape(k, s)
                # Row views are kept for big-datagram trains in the first slots (bounded memory).
                cache = self.rx_views if s >= CACHED_MIN_SEGMENT and j < CACHED_SLOTS else None
                opened = open_rows(self.device, rows, t - (k - 1) * s, src, now, cache, j * slot)
                if opened is not None:
                    trains.append((j, k, s, opened))
                    continue
            self._deliver_trains(trains)
            trains = []
            base = j * slot
            pending.extend((flat[base + a : base + min(a + s, t)], src) for a in range(0, t, s))
        self._deliver_trains(trains)
        self._open_views(pending, now)

    def _deliver_trains(self, trains: list[tuple[int, int, int, OpenedRows]]) -> None:
        """Opened trains to the TUN, in order: several at once through gro_trains when they are clean runs
        of equal-size segments in consecutive slots (the receiver is behind), else one by one."""
        merged = self._merge_trains(trains) if len(trains) >= 2 and self.tun.vnet else None
        for i, (j, k, s, opened) in enumerate(trains):
            write = merged.writes[i] if merged is not None else None
            if write is None:
                self._deliver_rows(self.rx_arena.data[j, : k * s].reshape(k, s), opened)
                continue
            if opened.events:
                self.send_events(opened.events)
            self.counters.rx_bytes += int(opened.lengths.sum())
            ok = self.tun.write_batch([(write,)])
            self.counters.tun_writes += ok
            if ok:
                self.counters.rx_packets += k
            else:
                self.counters.drops["tun_write_error"] += 1

    def _merge_trains(self, trains: list[tuple[int, int, int, OpenedRows]]) -> MergedTrains | None:
        j0, _, s, first = trains[0]
        full = int(first.lengths[0])
        step = trains[1][0] - j0  # every slot, or every other when rests were appended (append_rests)
        for i, (j, k, s_j, opened) in enumerate(trains):
            if j != j0 + i * step or s_j != s or opened.keep is not None:
                return None
            if not bool((opened.lengths[: k - 1] == full).all()):
                return None
        counts = np.array([k for _, k, _, _ in trains], np.int64)
        content = wgm.MESSAGE_TRANSPORT_OFFSET_CONTENT
        lasts = np.array([content + int(o.lengths[k - 1]) for _, k, _, o in trains], np.int64)
        rows = self.rx_arena.slot_rows(j0, len(trains), int(counts.max()), s, step)
        self._train_out = out_arena(len(trains), self._train_out)
        return coalesce_trains(rows, counts, lasts, content, self._train_out, full_len=full)

    def _source(self, j: int) -> tuple:
        """The sender of arena message j as (host, port), from a small cache keyed by the raw sockaddr."""
        raw = self.rx_arena.names[j].tobytes()
        ep = self._sources.get(raw)
        if ep is None:
            if len(self._sources) >= MAX_CACHED:
                self._sources.clear()
            ep = self._sources[raw] = decode_sockaddr(raw)
        return ep

    def _deliver_rows(self, rows: np.ndarray, opened: OpenedRows) -> None:
        if opened.events:
            self.send_events(opened.events)
        keep = opened.keep
        if keep is None:
            buf, lengths = rows, opened.lengths
        else:
            idx = np.flatnonzero(keep)
            if len(idx) == 0:
                return
            buf, lengths = rows[idx], opened.lengths[idx]
        self._write_inner(PacketBatch(buf, lengths, wgm.MESSAGE_TRANSPORT_OFFSET_CONTENT, len(lengths)))

    def _open_views(self, pending: list[tuple[memoryview, tuple]], now: float) -> None:
        """Datagrams one by one (handshakes, short trains, no GRO): runs from one source share one
        open_batch call; the delivered packets are copied into one batch for validation and GRO."""
        if not pending:
            return
        events: list[Event] = []
        delivered: list[memoryview] = []
        a = 0
        while a < len(pending):
            src = pending[a][1]
            z = a + 1
            while z < len(pending) and pending[z][1] == src:
                z += 1
            opened = open_batch(self.device, [v for v, _ in pending[a:z]], src, now)
            events.extend(opened.events)
            delivered.extend(v for _, v in opened.delivered)
            a = z
        if events:
            self.send_events(events)
        if not delivered:
            return
        if self.tun.vnet and len(delivered) > FEW:
            self._write_inner(PacketBatch.from_packets(delivered, HEADROOM))
            return
        # Written where they lie, with a zero virtio header: nothing to coalesce, and the kernel checks
        # the checksums of such packets itself (as for any packet written without NEEDS_CSUM).
        writes = [(ZERO_VNET_HDR, v) for v in delivered] if self.tun.vnet else [(v,) for v in delivered]
        self.counters.rx_bytes += sum(len(v) for v in delivered)
        ok = self.tun.write_batch(writes)
        self.counters.tun_writes += ok
        self.counters.rx_packets += ok
        if ok < len(writes):
            self.counters.drops["tun_write_error"] += len(writes) - ok

    def _write_inner(self, inner: PacketBatch) -> None:
        """Decrypted inner packets to the TUN: validated, coalesced (GRO) into as few writes as possible."""
        n = inner.n
        self.counters.rx_bytes += int(inner.lengths[:n].sum())
        uso = getattr(self.tun, "uso", False)
        run = udp_run(inner) if uso and n > 1 else None  # one UDP flow's datagrams, checked in one pass
        acks = ack_run(inner) if run is None and self.tun.vnet else None  # pure ACKs, a write each
        if run is not None:
            bad, writes = 0, [(run,)]
        elif acks is not None:
            bad, writes = 0, acks
        elif self.tun.vnet:
            # coalesce validates (L4 checksums included: the kernel trusts a coalesced NEEDS_CSUM packet)
            # and leaves out what fails; what it left out is counted from what it wrote.
            writes = coalesce(inner, None, vnet=True, gro=True, uso=uso)
            bad = n - packets_in_writes(writes)
            if bad:
                self.counters.drops["bad_inner_packet"] += bad
        else:
            bad = 0
            writes = [(v,) for v in inner.views()]
        ok = self.tun.write_batch(writes)
        self.counters.tun_writes += ok
        if ok < len(writes):
            self.counters.drops["tun_write_error"] += len(writes) - ok
        self.counters.rx_packets += n - bad
