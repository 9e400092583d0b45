"""Per-row paths of the engine for a few small packets (ACKs, pings): checked, looked up and sent or
delivered one by one in plain Python, which costs less than the ~30-60 array operations of the batch
pipelines when a batch holds a handful of rows; the ACK filter's call (packet/ack_filter.py); and the
receive of a train that is one clean run (TCP segments, or one UDP flow's datagrams when the TUN takes
USO), judged by its row 0 in Python and by gro_run / gro_udp for the rest. Each falls back (returns
False, having done nothing) when a row needs the batch pipeline's judgement, so drops are always counted
there. Both encapsulations: vxlan writes its header in front, udp takes the TTL down by one as flannel's
udp proxy does.

RowPaths is a mixin of dataplane.engine.Engine and uses its attributes: cfg, tun, table, pool, _pools,
_dsts, _flows, _header_bytes, _outer_v6, head, counters, _rx_prefix, _uso, _ack_filter, _count, _deliver,
deliver_run and flush_held (rx_hold), _encapsulate (tx_super). No sockets of its own, no clock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from udpflannel.dataplane.counters import DROP_NAMES, INDEX
from udpflannel.dataplane.peers import NO_PEER
from udpflannel.dataplane.txprep import FLOW_HASH_BYTES, finish_partial, finish_run_checksums, flow_hash_one
from udpflannel.packet import headers as h
from udpflannel.packet.ack_filter import is_pure_ack, redundant_acks
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.drops import DropReason
from udpflannel.packet.gro_acks import ack_run
from udpflannel.packet.gro_run import coalesce_run
from udpflannel.packet.gro_udp import udp_run
from udpflannel.packet.parse import validate_one
from udpflannel.packet.vnet import VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_LEN, VNET_HDR_STRUCT, ZERO_VNET_HDR

FLOW_CACHE_MAX = 4096  # flows remembered by the superpacket path; cleared when full or when peers change
_PORTS = (h.IPPROTO_TCP, h.IPPROTO_UDP)  # protocols whose flows _flow caches
_ETHERTYPE = {4: b"\x08\x00", 6: b"\x86\xdd"}  # the inner Ethernet type a VXLAN frame must carry
_SEND_ERROR = INDEX[DROP_NAMES[DropReason.SEND_ERROR]]
_BAD_HEADER = INDEX[DROP_NAMES[DropReason.BAD_HEADER]]
_TUN_WRITE_ERROR = INDEX[DROP_NAMES[DropReason.TUN_WRITE_ERROR]]


class RowPaths:
    def _flow(self, buf: np.ndarray, off: int, i: int) -> tuple[int, int]:
        """_flow_of the packet in row i of `buf` (at column `off`)."""
        return self._flow_of(buf[i, off : off + FLOW_HASH_BYTES].tobytes())

    def _flow_of(self, head: bytes) -> tuple[int, int]:
        """(peer index or NO_PEER, source socket index) of a packet from its first FLOW_HASH_BYTES bytes,
        found in plain Python (a lone packet pays no array calls). TCP and UDP flows repeat packet after
        packet, so their answer is cached by the address+port bytes (cleared when peers change); other
        protocols are not (ICMP holds its checksum where ports would be: one entry a packet)."""
        v6 = head[0] >> 4 == 6
        key = head[8:44] if v6 else head[12:24]
        hit = self._flows.get(key)
        if hit is None:
            hit = (self.table.lookup_one(head), flow_hash_one(head) % len(self.pool))
            if head[h.IPV6_NEXT_HDR if v6 else h.IPV4_PROTO] in _PORTS:
                if len(self._flows) >= FLOW_CACHE_MAX:
                    self._flows.clear()
                self._flows[key] = hit
        return hit

    def _one_flow(self, batch: PacketBatch, rows: np.ndarray) -> tuple[int, int] | None:
        """(peer index, socket index) from the flow cache when every row in `rows` carries the first one's
        version byte, addresses and ports (the bytes _flow keys on); else None."""
        if len(rows) < 2:
            return None
        off, buf = batch.offset, batch.buf
        first = int(rows[0])
        lead = buf[first, off]
        lo, hi = (8, 44) if lead >> 4 == 6 else (12, 24)
        keys = buf[rows, off + lo : off + hi]
        if np.count_nonzero(buf[rows, off] != lead) or np.count_nonzero(keys != keys[0]):
            return None
        return self._flow(buf, off, first)

    def finish_few(
        self, batch: PacketBatch, hd: list[tuple[int, ...]], only: Sequence[int] | None = None
    ) -> list[int]:
        """The rows of a few plain TUN reads (hd: their virtio headers as tuples; `only`: these rows of
        them), partial checksums finished one by one; a row whose checksum offsets point outside its
        packet is counted as a bad_header drop and left out."""
        off, buf, lengths = batch.offset, batch.buf, batch.lengths
        rows = []
        for i in range(len(hd)) if only is None else only:
            x = hd[i]
            if x[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM and not finish_partial(
                buf[i, off : off + int(lengths[i])].data, x[4], x[5]
            ):
                self.counters[_BAD_HEADER] += 1
                continue
            rows.append(i)
        return rows

    def _filter_acks(self, batch: PacketBatch, rows: Sequence[int]) -> Sequence[int]:
        """`rows` (ascending) less the pure ACKs a later one in the read makes redundant
        (packet/ack_filter.py), when the filter is on and the first of them is a pure ACK (a read worth
        filtering)."""
        if len(rows) < 2 or not self._ack_filter:
            return rows
        first = rows[0]
        if not is_pure_ack(batch.buf, batch.offset, first, int(batch.lengths[first])):
            return rows
        redundant = redundant_acks(batch.buf, batch.offset, batch.lengths[: batch.n].tolist(), rows)
        if not redundant:
            return rows
        self._count("tx_acks_filtered", len(redundant))
        return [i for i in rows if i not in redundant]

    def _redundant_received(self, buf: np.ndarray, inner: int, lengths: list[int]) -> set[int]:
        """The received rows (inner packets at buf[i, inner:], lengths[i] bytes, judged sound already)
        that are ACKs a later one in the receive makes redundant, when the filter is on: not written to
        the TUN, counted."""
        if len(lengths) < 2 or not self._ack_filter:
            return set()
        redundant = redundant_acks(buf, inner, lengths, range(len(lengths)))
        if redundant:
            self._count("rx_acks_filtered", len(redundant))
        return redundant

    def send_lone(self, row: memoryview, off: int, ln: int, vnet: bool) -> bool:
        """A TUN read of one plain packet (a ping, or an ACK at a moderate rate): judged and sent from a
        view of its row (`off`: where the packet starts, its virtio header in front when `vnet`) with no
        array calls at all, which matters most for a packet after a pause, when every call runs cold.
        Sends nothing and returns False, the packet untouched, when it needs the batch paths (a
        superpacket, no peer, over the MTU, malformed: they judge and count it)."""
        flags = start = field = 0
        if vnet:
            flags, gso_type, _, _, start, field = VNET_HDR_STRUCT.unpack_from(row, off - VNET_HDR_LEN)
            if gso_type:
                return False
        route = self._row_route(row, off, ln)
        if route is None:
            return False
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not finish_partial(row[off : off + ln], start, field):
            return False
        peer, sock = route
        head = self.head
        self._encapsulate_row(row, off, peer)
        if sock.send_one(row[off - head : off + ln], self._dsts[peer]):
            self._count("tx_packets")
            self._count("tx_bytes", ln)
        else:
            self.counters[_SEND_ERROR] += 1
        self._count("tx_send_calls")
        return True

    def send_few(self, batch: PacketBatch, rows: list[int]) -> bool:
        """A few unrelated packets (ACKs, pings): per-row cached lookups cost less than the ~30 array
        operations of the general path. Sends nothing and returns False when any row needs the general
        path (no peer, over the MTU, malformed)."""
        off, head, buf = batch.offset, self.head, batch.buf
        lengths = batch.lengths[: batch.n].tolist()
        plan = []
        for i in rows:
            row = buf[i].data
            route = self._row_route(row, off, lengths[i])
            if route is None:
                return False
            plan.append((i, row, lengths[i], *route))
        groups: dict[tuple[int, int], tuple[Any, int, list[int], list[int]]] = {}  # by socket and peer
        for i, row, ln, peer, sock in plan:
            self._encapsulate_row(row, off, peer)
            group = groups.setdefault((id(sock), peer), (sock, peer, [], []))
            group[2].append(i)
            group[3].append(ln + head)
        sent = 0
        contiguous = buf.flags.c_contiguous
        for sock, peer, rows_of, sizes in groups.values():
            calls, before = sock.stats.send_calls, sock.stats.sent
            dest = self._dsts[peer]
            if len(rows_of) == 1:  # one sendto: cheaper than setting up a sendmmsg
                sock.send_one(buf[rows_of[0], off - head : off - head + sizes[0]].data, dest)
            elif contiguous:  # iovecs as arrays from the buffer's address: no per-datagram objects
                sock.send_rows(buf, np.array(rows_of), off - head, np.array(sizes), dest)
            else:
                col = off - head
                items = [(buf[i, col : col + z].data, dest) for i, z in zip(rows_of, sizes, strict=True)]
                sock.sendmmsg(items)
            sent += sock.stats.sent - before
            self._count("tx_send_calls", sock.stats.send_calls - calls)
        self._count("tx_packets", sent)
        self._count("tx_bytes", sum(p[2] for p in plan))
        if sent < len(plan):
            self.counters[_SEND_ERROR] += len(plan) - sent
        return True

    def _row_route(self, row: memoryview, off: int, ln: int) -> tuple[int, Any] | None:
        """(peer index, socket to send from) for the plain packet at row[off:off + ln], or None when the
        batch paths must judge it: not IPv4 or IPv6 of 40 bytes to the MTU, no peer, or (udp) a TTL that
        would expire here."""
        version = row[off] >> 4
        if not 40 <= ln <= self.cfg.mtu or version not in (4, 6):
            return None
        if not self.head and row[off + (h.IPV4_TTL if version == 4 else h.IPV6_HOP_LIMIT)] <= 1:
            return None  # the udp proxy's TTL rule: the general path answers time exceeded
        peer, sock_index = self._flow_of(bytes(row[off : off + FLOW_HASH_BYTES]))
        if peer == NO_PEER:
            return None
        pool = self._pools[self._outer_v6[peer]]
        return peer, pool[sock_index % len(pool)]

    def _encapsulate_row(self, row: memoryview, off: int, peer: int) -> None:
        """vxlan: the peer's VXLAN and inner Ethernet header in front of the packet at row[off:]; udp: its
        TTL (hop limit) down by one, as flannel's udp proxy forwards."""
        head = self.head
        if not head:
            _decrement_ttl(row, off)
            return
        row[off - head : off] = self._header_bytes[peer]  # the template with the peer's VtepMAC
        if row[off] >> 4 == 6:
            row[off - 2 : off] = _ETHERTYPE[6]

    def send_run(self, batch: PacketBatch, hdr: tuple[int, ...]) -> bool:
        """A TUN batch of one flow's plain packets (a packet-rate sender) that share one virtio header
        (hdr, as a tuple): one flow-cache lookup, the checksums finished on a view of the rows, the peer's
        header broadcast, and UDP_SEGMENT messages when the packets are equally long. The counterpart of
        receive_run; the general path (send_batch) spends ~60 array operations on the same rows. Sends
        nothing and returns False when any row needs that path's judgement."""
        n, off, buf = batch.n, batch.offset, batch.buf
        flags, gso_type, _, _, start, field = hdr
        if n < 2 or gso_type:
            return False
        lens = batch.lengths[:n]
        lead = int(buf[0, off])
        lo, hi = (8, 44) if lead >> 4 == 6 else (12, 24)  # the bytes _flow keys on: addresses and ports
        keys = buf[:n, off + lo : off + hi]
        if (
            lead >> 4 not in (4, 6)
            or np.count_nonzero(buf[:n, off] != lead)
            or np.count_nonzero(keys != keys[0])
        ):
            return False
        peer, sock_index = self._flow(buf, off, 0)
        if peer == NO_PEER or int(lens.min()) < 40 or int(lens.max()) > self.cfg.mtu:
            return False
        if (
            not self.head
            and int(buf[:n, off + (h.IPV4_TTL if lead >> 4 == 4 else h.IPV6_HOP_LIMIT)].min()) <= 1
        ):
            return False  # the udp proxy's TTL rule: the general path answers time exceeded
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not finish_run_checksums(batch, start, field):
            return False
        self._encapsulate(buf, lens, off, peer)
        pool = self._pools[int(self.table.outer_v6[peer])]
        sock = pool[sock_index % len(pool)]
        calls, before = sock.stats.send_calls, sock.stats.sent
        dest, head, rows = self._dsts[peer], self.head, np.arange(n)
        longest, final = int(lens[0]), int(lens[n - 1])
        # rows 0..n-2 each as long as the next (so as row 0), the last no longer: UDP_SEGMENT messages
        equal = final <= longest and (n == 2 or lens[: n - 2].tobytes() == lens[1 : n - 1].tobytes())
        if buf.flags.c_contiguous and equal:
            sock.send_rows_gso(buf, rows, off - head, longest + head, final + head, dest)
        elif buf.flags.c_contiguous:
            sock.send_rows(buf, rows, off - head, lens + head, dest)
        else:
            views = batch.views(head=head)
            sock.sendmmsg([(v, dest) for v in views])
        sent = sock.stats.sent - before
        self._count("tx_send_calls", sock.stats.send_calls - calls)
        self._count("tx_packets", sent)
        self._count("tx_bytes", int(lens.sum()))
        if sent < n:
            self.counters[_SEND_ERROR] += n - sent
        return True

    def receive_few(self, batch: PacketBatch, src_addr: np.ndarray) -> bool:
        """A few datagrams (ACKs, pings): checked one by one in plain Python, which costs less than the
        ~60 array operations of the general path. Writes nothing and returns False when any row is not a
        sound frame from a peer (the general path then judges and counts every row)."""
        off, buf = batch.offset, batch.buf
        plan = []
        for i, ln in enumerate(batch.lengths[: batch.n].tolist()):
            row = buf[i].data
            length = self._frame_length(row, off, ln, src_addr[i].tobytes())
            if length is None:
                return False
            plan.append((row, length))
        redundant = self._redundant_received(buf, off + self.head, [ln for _, ln in plan])
        if redundant:
            plan = [p for i, p in enumerate(plan) if i not in redundant]
        self._write_frames(plan, off + self.head)
        return True

    def receive_lone(self, row: memoryview, ln: int, source: bytes) -> bool:
        """The one datagram of a receive (at the start of `row`, `ln` bytes, from `source`): receive_few
        for it with no array calls at all, which matters most for a packet after a pause, when every call
        runs cold. False, having written nothing, when the batch paths must judge it."""
        length = self._frame_length(row, 0, ln, source)
        if length is None:
            return False
        self._write_frames([(row, length)], self.head)
        return True

    def _frame_length(self, row: memoryview, off: int, ln: int, source: bytes) -> int | None:
        """The inner packet's length when the frame at row[off:off + ln] is sound (our VXLAN header and
        inner Ethernet header, vxlan), came from a peer and holds a valid IP packet; else None."""
        head = self.head
        inner = off + head
        if ln <= head:
            return None
        version = row[inner] >> 4
        if head and (
            row[off : off + 14] != self._rx_prefix or row[off + 20 : inner] != _ETHERTYPE.get(version)
        ):
            return None
        if self.cfg.check_peer_source:
            v6 = len(source) == 16
            known = self.table.source6_set if v6 else self.table.source_set
            if (source if v6 else int.from_bytes(source, "big")) not in known:
                return None
        code, length = validate_one(row[inner : off + ln])
        return None if code else length

    def _write_frames(self, plan: list[tuple[memoryview, int]], inner: int) -> None:
        """Each (row, length): the inner packet at row[inner:inner + length] written to the TUN (behind a
        zero virtio header when the TUN takes one), and counted."""
        if self.tun.vnet and inner >= VNET_HDR_LEN:
            writes = []
            for row, length in plan:
                row[inner - VNET_HDR_LEN : inner] = ZERO_VNET_HDR  # no offload: a zero virtio header
                writes.append((row[inner - VNET_HDR_LEN : inner + length],))
        elif self.tun.vnet:  # no room in front (a udp train's view): the header as its own buffer
            writes = [(ZERO_VNET_HDR, row[inner : inner + length]) for row, length in plan]
        else:
            writes = [(row[inner : inner + length],) for row, length in plan]
        ok = self.tun.write_batch(writes)
        self._count("rx_coalesced_writes", ok)
        if ok == len(writes):
            self._count("rx_packets", ok)
            self._count("rx_bytes", sum(length for _, length in plan))
        else:
            self.counters[_TUN_WRITE_ERROR] += len(writes) - ok

    def receive_run(self, batch: PacketBatch, src_addr: np.ndarray) -> bool:
        """A train of one flow's segments that makes one superpacket (the commonest receive under load):
        one TUN write (or held a moment for the rest of its superpacket: dataplane/rx_hold.py); when the
        TUN takes USO, one UDP flow's datagrams as one write; a train of pure ACKs (what a sender gets
        back), a write each. False, having done nothing, otherwise."""
        if not self._outer_ok(batch, src_addr):
            return False
        n, head, lens = batch.n, self.head, batch.lengths
        run = coalesce_run(batch, head)
        if run is not None:  # (its rows are equally long but the last: coalesce_run checked)
            self.deliver_run(run, n, (n - 1) * int(lens[0]) + int(lens[n - 1]) - n * head)
            return True
        nbytes = int(lens[:n].sum()) - n * head  # the inner packets' bytes
        run = udp_run(batch, head) if self._uso else None
        writes = [(run,)] if run is not None else ack_run(batch, head)
        if writes is None:
            return False
        if run is None:  # an ACK train: the last of one flow's ACKs says it all
            inner = (lens[:n] - head).tolist()
            redundant = self._redundant_received(batch.buf, batch.offset + head, inner)
            if redundant:
                writes = [w for i, w in enumerate(writes) if i not in redundant]
                n -= len(redundant)
                nbytes -= sum(inner[i] for i in redundant)
        self.flush_held()  # (neither is ever held: nothing joins a UDP run, and ACKs carry no data)
        self._deliver(writes, n, nbytes)
        return True

    def _run_of(self, batch: PacketBatch, src_addr: np.ndarray) -> tuple[memoryview, int, int] | None:
        """A TCP run's write (gro_run.coalesce_run) with the inner packets and bytes it holds, for a join
        with the held run; None when the train is not such a run."""
        if not self._outer_ok(batch, src_addr):
            return None
        n, head = batch.n, self.head
        run = coalesce_run(batch, head)
        return None if run is None else (run, n, int(batch.lengths[:n].sum()) - n * head)

    def _outer_ok(self, batch: PacketBatch, src_addr: np.ndarray) -> bool:
        """Row 0's outer header is ours (VXLAN: VNI, MAC, inner ethertype; the run checks hold every other
        row to it) and every row came from a peer."""
        n, off, head = batch.n, batch.offset, self.head
        if head:
            row0 = batch.buf[0, off : off + head + 1].tobytes()
            if len(row0) <= head or row0[:14] != self._rx_prefix:
                return False
            if row0[20:head] != _ETHERTYPE.get(row0[-1] >> 4):
                return False
        return not (self.cfg.check_peer_source and self.table.any_stranger(src_addr[:n]))


def _decrement_ttl(row: memoryview, off: int) -> None:
    """flannel's udp proxy forwards like a router: TTL (IPv4, header checksum fixed as RFC 1624 eqn. 3
    does: the word holding TTL went down by 0x0100) or hop limit (IPv6) down by one, for one packet."""
    if row[off] >> 4 == 6:
        row[off + h.IPV6_HOP_LIMIT] -= 1
        return
    row[off + h.IPV4_TTL] -= 1
    at = off + h.IPV4_CSUM
    s = (~((row[at] << 8) | row[at + 1]) & 0xFFFF) + 0xFEFF
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    new = ~s & 0xFFFF
    row[at] = new >> 8
    row[at + 1] = new & 0xFF
