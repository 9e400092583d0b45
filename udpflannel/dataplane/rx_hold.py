"""The receive loop over one recvmmsg's records, and the join of a superpacket that arrives in two trains.

A 64 KiB TCP superpacket is 46-47 datagrams, more than one UDP_SEGMENT send may carry (65507 bytes), so
the sender sends 44 and the rest as two messages of one sendmmsg, and they arrive as two trains. Written
as they come, that is two TUN writes, and twice the TCP receive work and ACKs, for one superpacket. When
both come in one receive, io.udp_recv.append_rests makes them one train already. When they come in two,
a run whose last segment is full-size (its superpacket goes on) is held while one receive looks for the
rest (packet.gro_run.join_runs), after the worker's TX turn, so ACKs are not held up; anything else and
it is written as it was. The worker waits a moment for the rest before it sleeps (dataplane/worker.py)
and writes what is still held then; order is kept: a held run is written before any later record is
handled.

HeldRun is a mixin of dataplane.engine.Engine and uses its attributes: rx, tun, head, process_rx,
process_train_set, few, _count, _deliver, _internal_error, _run_of and receive_lone (rowpath)."""

from __future__ import annotations

from typing import Any

import numpy as np

from udpflannel.io.udp import LoneDatagram, Received, TrainSet
from udpflannel.packet import headers as h
from udpflannel.packet.gro_run import join_runs
from udpflannel.packet.vnet import VNET_HDR_LEN, VNET_HDR_STRUCT


class HeldRun:
    hold_runs = False  # the worker's loop turns it on (and flushes before it sleeps); tests see every write
    _held: tuple[memoryview, int, int] | None = None  # (write, inner packets, inner bytes)
    _may_hold = False  # only inside rx_once: process_rx called on its own writes at once

    @property
    def holding(self) -> bool:
        """A run is held for its rest: flush_held() writes it."""
        return self._held is not None

    def rx_once(self, sock: Any = None) -> int:
        """Receive one batch of datagrams (from `sock`, default the IPv4 socket) and deliver it; returns
        datagrams received. With hold_runs, the last run may stay held for the next rx_once: the caller
        calls flush_held() before it waits for more."""
        rx = sock or self.rx  # type: ignore[attr-defined]
        sets = self.tun.vnet  # type: ignore[attr-defined]
        self._may_hold = self.hold_runs and sets
        try:
            appended = rx.stats.rests_appended
            records = rx.recv_trains(sets=sets, lone=True)
            if rx.stats.rests_appended != appended:  # superpackets made whole in the receive buffer
                self._count("rx_joined_runs", rx.stats.rests_appended - appended)  # type: ignore[attr-defined]
            return self._receive_records(records)
        finally:
            self._may_hold = False
            if not self.hold_runs:
                self.flush_held()

    def _receive_records(self, records: list[Received | TrainSet | LoneDatagram]) -> int:
        # GRO trains arrive as zero-copy views of the receive buffer: each is delivered before the next
        # receive reuses that buffer (a held run is a copy already). A held run meets the next record
        # first: a train set's first write joins it or flushes it (deliver_run), a lone train here.
        total = 0
        for rec in records:
            if isinstance(rec, LoneDatagram):  # a ping, an ACK at a moderate rate: no array calls
                total += 1
                self.flush_held()
                try:
                    if self.receive_lone(rec.row, rec.length, rec.source):  # type: ignore[attr-defined]
                        self._count("rx_batches")  # type: ignore[attr-defined]
                    else:
                        got = rec.received()  # the batch paths judge and count it
                        self.process_rx(got.batch, got.src_addr)  # type: ignore[attr-defined]
                except Exception:
                    self._internal_error(1)  # type: ignore[attr-defined]
                continue
            if isinstance(rec, TrainSet):
                n = int(rec.counts.sum())
                total += n
                try:
                    self.process_train_set(rec)  # type: ignore[attr-defined]
                except Exception:
                    self._internal_error(n)  # type: ignore[attr-defined]
                continue
            total += rec.batch.n
            try:
                self.receive_train(rec)
            except Exception:  # a bug must not stop the datapath: drop the batch, count it
                self._internal_error(rec.batch.n)  # type: ignore[attr-defined]
        return total

    def receive_train(self, rec: Received) -> None:
        """One train (or batch) to the TUN: joined to the held run when it is its rest, else after it.
        A run judged here for the join is not judged again by process_rx: unless the per-row path would
        have had the train first (a few rows), it is written (or held) as receive_run would."""
        batch = rec.batch
        if self._held is not None:
            run = self._run_of(batch, rec.src_addr) if batch.n >= 2 else None  # type: ignore[attr-defined]
            if run is not None:
                joined = self._join_held(*run)
                if joined is not None or not self.few(batch):  # type: ignore[attr-defined]
                    self._count("rx_batches")  # type: ignore[attr-defined]
                    self.flush_held()
                    self._hold_or_write(*(joined or run))
                    return
            self.flush_held()
        self.process_rx(batch, rec.src_addr)  # type: ignore[attr-defined]

    def deliver_run(self, run: memoryview, packets: int, nbytes: int, *, owned: bool = True) -> None:
        """Write a coalesced run: joined to the held one when it is its rest (else after it), held itself
        when it may go on (its last segment is full-size and 64 KiB leave room for another), else at once.
        owned=False: `run` lies in a buffer the next receive reuses, so it is copied if it is held."""
        joined = self._join_held(run, packets, nbytes) if self._held is not None else None
        self.flush_held()
        if joined is not None:
            self._hold_or_write(*joined)
        else:
            self._hold_or_write(run, packets, nbytes, owned=owned)

    def flush_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._deliver([(held[0],)], held[1], held[2])  # type: ignore[attr-defined]

    def _join_held(self, run: memoryview, packets: int, nbytes: int) -> tuple[memoryview, int, int] | None:
        """The held run with `run` appended, counts summed, when `run` is its rest (the held run is then
        let go of); else None and the held run stays."""
        assert self._held is not None
        held, held_packets, held_bytes = self._held
        joined = join_runs(held, run)
        if joined is None:
            return None
        self._held = None
        self._count("rx_joined_runs")  # type: ignore[attr-defined]
        return joined, held_packets + packets, held_bytes + nbytes

    def may_go_on(self, run: memoryview) -> bool:
        """A run to hold for its rest (when runs may be held): its last segment is full-size and 64 KiB
        leave room for another."""
        if not self._may_hold:
            return False
        _, _, hl, gso, _, _ = VNET_HDR_STRUCT.unpack_from(run, 0)
        paid = len(run) - VNET_HDR_LEN - hl
        return bool(gso) and paid % gso == 0 and len(run) - VNET_HDR_LEN + gso <= h.IP_MAXPACKET

    def _hold_or_write(self, run: memoryview, packets: int, nbytes: int, *, owned: bool = True) -> None:
        if self.may_go_on(run):
            if not owned:
                run = memoryview(np.frombuffer(run, np.uint8).copy())
            self._held = (run, packets, nbytes)
            return
        self._deliver([(run,)], packets, nbytes)  # type: ignore[attr-defined]
