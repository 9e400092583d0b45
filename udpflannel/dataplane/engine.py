"""The datapath engine: TX (TUN -> split -> peer lookup -> encapsulate -> UDP) and RX (UDP -> decapsulate ->
validate -> coalesce -> TUN), one batch at a time, for the vxlan and udp encapsulations.

Per batch, the decisions (peer lookup, size and header checks, header writes, drop codes) are numpy over all
rows; the I/O objects (io.tun.Tun, io.udp.UdpSocket) turn a batch into as few syscalls as the offloads allow
(one UDP_SEGMENT sendmsg per superpacket, one TUN write per coalesced run). Every refused packet is counted
under its DropReason, and a failure inside a batch drops that batch (INTERNAL_ERROR), never the loop.
The clock is not read here.
"""

from __future__ import annotations

import logging

import numpy as np

from udpflannel.codec import udp as udp_codec
from udpflannel.codec import vxlan as vxlan_codec
from udpflannel.dataplane import icmp
from udpflannel.dataplane.counters import DROP_NAMES, INDEX
from udpflannel.dataplane.peers import NO_PEER, Peer, PeerTable
from udpflannel.dataplane.rowpath import RowPaths
from udpflannel.dataplane.rx_hold import HeldRun
from udpflannel.dataplane.spec import HEADROOM, EngineConfig
from udpflannel.dataplane.tx_super import SuperpacketTx
from udpflannel.dataplane.tx_tunnel import TunnelTx
from udpflannel.dataplane.txprep import (
    FLOW_HASH_BYTES,
    finish_partial_checksums,
    flow_hash,
    is_gso,
    needs_csum,
)
from udpflannel.io.linux import ack_filter_disabled
from udpflannel.io.udp_recv import TrainSet
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.drops import DropReason
from udpflannel.packet.gro import coalesce, coalesce_train
from udpflannel.packet.gro_trains import MergedTrains, coalesce_trains, out_arena
from udpflannel.packet.parse import ip_fields, validate_ip
from udpflannel.packet.vnet import VNET_HDR_STRUCT

log = logging.getLogger(__name__)

MAX_ERRORS_LOGGED = 5
TX_BATCH = 64  # TUN reads per batch (each may be a 64 KiB superpacket)
FEW_PACKETS = 4  # up to this many plain packets per batch take the per-row paths (send_few, receive_few)
# ... and up to this many when all are small (ACKs): per row ~5-10 us vs ~150 us for the array pipeline
FEW_SMALL_PACKETS = 16
SMALL_PACKET = 256
# From this many plain packets sharing one virtio header (a receiver's ACKs, ~10 to a TUN read at full
# speed), send_run's array path is tried first: 12 ACKs of one flow 47 us against 68 row by row, 6: 47
# against 43 (/tmp timing of process_tx, alternating).
SEND_RUN_MIN = 8

# codec result code -> DropReason, as lookup arrays indexed by the code
_VXLAN_DROPS = np.array(
    [
        DropReason.NONE,
        DropReason.BAD_HEADER,
        DropReason.BAD_VNI,
        DropReason.WRONG_DST_MAC,
        DropReason.BAD_ETHERTYPE,
    ],
    dtype=np.uint8,
)
_UDP_DROPS = np.array([DropReason.NONE, DropReason.BAD_HEADER, DropReason.TTL_EXCEEDED], dtype=np.uint8)
_DROP_SLOT = np.full(max(DropReason) + 1, -1, dtype=np.int64)
for _reason, _name in DROP_NAMES.items():
    _DROP_SLOT[_reason] = INDEX[_name]


class Engine(RowPaths, HeldRun, SuperpacketTx, TunnelTx):
    """Owns the peer table and the per-batch pipelines. tun: io.tun.Tun; rx: the UdpSocket on our port;
    pool: UdpSockets to send from (one per outer source port; udp backend: [rx])."""

    def __init__(
        self,
        cfg: EngineConfig,
        tun,
        rx,
        pool: list,
        counters: np.ndarray,
        rx6=None,
        pool6: list | None = None,
    ) -> None:
        self.cfg = cfg
        self.tun = tun
        self.rx = rx
        self.pool = pool
        self.rx6 = rx6  # IPv6 underlay (optional): peers whose outer address is IPv6 are sent from pool6
        self.pool6 = pool6 or []
        self._pools = (self.pool, self.pool6 or self.pool)
        self.counters = counters
        # The same cells as a memoryview: one cell's += costs ~0.1 us this way, ~1 us through numpy.
        self._cells = memoryview(counters)
        self.table = PeerTable()
        self._uso = getattr(tun, "uso", False)  # a receive of one UDP flow's datagrams can be one write
        self.is_vxlan = cfg.encap == "vxlan"
        self.head = vxlan_codec.VXLAN_HEADROOM if self.is_vxlan else 0
        self.mac = vxlan_codec.parse_mac(cfg.vtep_mac)
        self.template = vxlan_codec.vxlan_header_template(cfg.vni, self.mac)
        self.rx_prefix = vxlan_codec.expected_prefix(cfg.vni, self.mac)
        self._rx_prefix = self.rx_prefix.tobytes()
        self.rx_expected = vxlan_codec.expected_headers(cfg.vni, self.mac)
        self.tx_arena: PacketBatch | None = None
        self.tx_drained = True  # the last tx_once emptied the TUN queue (the worker then waits in poll)
        self._dsts: list[tuple[str, int]] = []
        self._errors_logged = 0
        self._flows: dict[bytes, tuple[int, int]] = {}
        self._headers = self.template[None, :].copy()  # per-peer headers, rebuilt by set_peers
        self._header_bytes = [self.template.tobytes()]  # the same as bytes (send_lone)
        self._outer_v6: list[bool] = [False]  # per peer: reached over the IPv6 underlay
        self._tx_row0: memoryview | None = None  # the TUN read arena's first row (send_lone)
        self._train_out: np.ndarray | None = None  # gro_trains output arena, grown on demand
        self._ack_filter = not ack_filter_disabled()

    def _count(self, name: str, value: int = 1) -> None:
        self._cells[INDEX[name]] += value

    def _count_drops(self, codes: np.ndarray) -> None:
        if not codes.any():
            return
        counts = np.bincount(codes, minlength=len(_DROP_SLOT))
        for reason in np.flatnonzero(counts[1:]) + 1:
            self.counters[_DROP_SLOT[reason]] += counts[reason]

    def _internal_error(self, n: int) -> None:
        self.counters[_DROP_SLOT[DropReason.INTERNAL_ERROR]] += n
        if self._errors_logged < MAX_ERRORS_LOGGED:  # enough to debug, never a log flood
            self._errors_logged += 1
            log.exception("datapath bug: batch of %d packets dropped", n)

    def set_peers(self, peers: list[Peer]) -> None:
        """Swap in a new peer table (between batches, so traffic does not stop)."""
        self.table = PeerTable(peers)
        self._dsts = [(ip, self.cfg.port) for ip in self.table.public_ips]
        self._flows.clear()  # cached peer choices may be stale now
        # Each peer's VXLAN + inner Ethernet header (IPv4 ethertype), for the one-flow path.
        self._headers = np.repeat(self.template[None, :], max(len(self.table), 1), axis=0)
        self._headers[:, 8:14] = self.table.macs[: len(self._headers)]
        self._header_bytes = [row.tobytes() for row in self._headers]
        self._outer_v6 = self.table.outer_v6.tolist()
        self._tunnel_peers()
        self._count("peer_updates")

    # --- TX -----------------------------------------------------------------------------------------------

    def tx_once(self) -> int:
        """Read one batch from the TUN and send it; returns TUN reads done (0: nothing waiting).
        tx_drained tells whether the read found the queue empty."""
        if self.tx_arena is None:
            from udpflannel.io.tun import new_read_arena

            self.tx_arena = new_read_arena(TX_BATCH, HEADROOM)
            self._tx_row0 = memoryview(self.tx_arena.buf[0])
        try:
            read = self.tun.read_batch(TX_BATCH, HEADROOM, self.tx_arena)
        except OSError:  # EIO/EBADFD while the device is being taken down: nothing to read now
            self.tx_drained = True
            return 0
        self.tx_drained = read.drained
        n = read.batch.n
        if n == 0:
            return 0
        try:
            if n == 1 and self._send_lone_read(read.batch):
                return 1
            self.process_tx(read.batch, read.headers, read.header)
        except Exception:  # a bug must not stop the datapath: drop the batch, count it
            self._internal_error(n)
        return n

    def _send_lone_read(self, batch: PacketBatch) -> bool:
        """A read of one packet through send_lone, its row viewed without array calls when it lies in our
        read arena (the worker's case)."""
        buf = batch.buf
        row = self._tx_row0 if self.tx_arena is not None and buf.base is self.tx_arena.buf else None
        if row is None:
            row = buf[0].data
        if not self.send_lone(row, batch.offset, int(batch.lengths[0]), self.tun.vnet):
            return False
        self._count("tx_batches")
        return True

    def process_tx(self, batch: PacketBatch, headers: np.ndarray, header) -> None:
        """Send a batch of TUN reads with their virtio headers (VNET_HDR_DTYPE [n], zeros in plain mode).
        `header(i)` (row i's header as a VnetHdr) is accepted for older callers; the rows' headers are read
        from `headers` directly, which costs less."""
        self._count("tx_batches")
        n = batch.n
        if n >= SEND_RUN_MIN:
            # One virtio header for all (one flow's plain packets: ACKs, a packet-rate sender): one bytes
            # compare, then send_run, which does nothing when they are not one flow's.
            first = headers[:1].tobytes()
            if not first[1] and headers.tobytes() == first * n:
                # Many ACKs (a receiving pod when we fell behind): the redundant ones stay home first.
                rows = self._filter_acks(batch, range(n))
                if len(rows) < n:
                    self._send_plain(batch, self.finish_few(batch, headers.tolist(), rows), filtered=True)
                    return
                if self.send_run(batch, VNET_HDR_STRUCT.unpack(first)):
                    return
        # (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) per row: a batch holds a few rows
        # (a few superpackets, or a few dozen small packets), cheaper to sort in plain Python than as arrays.
        hd = headers.tolist()
        gso_list = [i for i, x in enumerate(hd) if x[1]]
        if not gso_list and len(hd) <= FEW_SMALL_PACKETS:
            # A few plain packets (ACKs, pings): redundant ACKs left out first, then checksums finished and
            # rows judged without array operations.
            rows = self._filter_acks(batch, range(len(hd)))
            self._send_plain(batch, self.finish_few(batch, hd, rows), filtered=True)
            return
        plain = None
        if len(gso_list) < len(hd):
            plain = ~is_gso(headers)
            partial = np.flatnonzero(plain & needs_csum(headers))
            if len(partial):
                bad = finish_partial_checksums(batch, headers, partial)
                if bad.any():
                    self._count_drops(bad)
                    plain[partial[bad != 0]] = False
        # udp: TTL down by one in each superpacket's header before the split copies it into every segment
        # (the split computes each segment's IPv4 checksum anyway); superpackets about to expire keep theirs
        # for send_superpacket's router answer.
        ttl_done = (
            udp_codec.decrement_ttl_rows(batch.buf, batch.offset, gso_list) if not self.is_vxlan else {}
        )
        if plain is None or not gso_list:  # the usual batch: all superpackets, or all plain packets
            if gso_list:
                self._send_superpackets(batch, headers, hd, gso_list, ttl_done)
            elif plain is not None:
                self._send_plain(batch, np.flatnonzero(plain).tolist())
            return
        # Both kinds: sent run by run in the order read, so a flow's lone segment neither overtakes the
        # superpacket read before it nor falls behind the one after (the receiver would see a gap).
        start = 0
        for end in range(1, len(hd) + 1):
            if end < len(hd) and bool(hd[end][1]) == bool(hd[start][1]):
                continue
            if hd[start][1]:
                self._send_superpackets(batch, headers, hd, list(range(start, end)), ttl_done)
            else:
                self._send_plain(batch, [i for i in range(start, end) if plain[i]])
            start = end

    def _send_plain(self, batch: PacketBatch, rows: list[int], *, filtered: bool = False) -> None:
        """Send the plain (not GSO) rows in `rows`, less redundant ACKs (unless `filtered` already): a few
        one by one, more as a batch."""
        if not filtered:
            rows = self._filter_acks(batch, rows)
        if not rows:
            return
        if len(rows) == 1:  # the usual ACK read once filtered: checksum finished, so no virtio header
            i = rows[0]
            if self.send_lone(batch.buf[i].data, batch.offset, int(batch.lengths[i]), False):
                return
        few = len(rows) <= FEW_PACKETS or (
            len(rows) <= FEW_SMALL_PACKETS and int(batch.lengths[rows].max()) <= SMALL_PACKET
        )
        if not (few and self.send_few(batch, rows)):
            plain = np.zeros(batch.n, dtype=bool)
            plain[rows] = True
            self.send_batch(batch, plain, one_flow=False)

    def plan_tx(
        self, batch: PacketBatch, active: np.ndarray, one_peer: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per row: (peer index or NO_PEER, DropReason code; NONE = send). Inactive rows get NONE and are
        skipped by the caller. one_peer: every row is one flow's, to this peer (_one_flow)."""
        n = batch.n
        off = batch.offset
        lens = batch.lengths[:n]
        version = batch.buf[:n, off] >> 4
        bad = ~((version == 4) & (lens >= 20)) & ~((version == 6) & (lens >= 40))
        if one_peer is None:
            peer = self.table.lookup_packets(batch.buf, off, n)
        else:
            peer = np.full(n, one_peer, np.int32)
        codes = np.zeros(n, dtype=np.uint8)
        codes[lens > self.cfg.mtu] = DropReason.OVER_MTU
        codes[peer == NO_PEER] = DropReason.UNKNOWN_PEER
        # Multicast/broadcast (IPv4 224/4 and up, IPv6 ff00::/8) never belongs to a peer subnet.
        not_unicast = ((version == 4) & (batch.buf[:n, off + 16] >= 224)) | (
            (version == 6) & (batch.buf[:n, off + 24] == 0xFF)
        )
        codes[(peer == NO_PEER) & not_unicast] = DropReason.NOT_UNICAST
        codes[bad] = DropReason.BAD_HEADER
        codes[~active] = DropReason.NONE
        return peer, codes

    def send_batch(
        self, batch: PacketBatch, active: np.ndarray, *, one_flow: bool, ttl_done: bool = False
    ) -> None:
        """Plan, answer what a router answers, encapsulate and send the active rows. ttl_done: udp, the
        rows' TTL already went down (in their superpacket), so it must not go down twice."""
        n = batch.n
        # A batch of one flow (a packet-rate sender): its peer and socket from the flow cache, not per row.
        flow = None if one_flow else self._one_flow(batch, np.flatnonzero(active))
        peer, codes = self.plan_tx(batch, active, None if flow is None else flow[0])
        if not self.is_vxlan and not ttl_done:
            # flannel's udp proxy routes like a router: TTL goes down by one on the way out.
            ok = active & (codes == DropReason.NONE)
            expired = udp_codec.decrement_ttl_batch(batch.buf, batch.lengths[:n], batch.offset, ok)
            codes[expired] = DropReason.TTL_EXCEEDED
        if codes.any():
            self._count_drops(codes)
            self._answer_drops(batch, codes)
        send = np.flatnonzero(active & (codes == DropReason.NONE))
        if len(send) == 0:
            return
        if self.is_vxlan:
            # Headers go into every row's headroom (inactive/dropped rows too: harmless), one vector write.
            macs = self.table.macs[np.maximum(peer, 0)]
            vxlan_codec.encode_batch(batch.buf, batch.lengths[:n], batch.offset, self.template, macs)
        lengths = batch.lengths
        npool = len(self.pool)
        if one_flow:
            # A split superpacket: one flow, one peer, one outer 5-tuple, as few UDP_SEGMENT sends as fit.
            pool = self._pools[int(self.table.outer_v6[peer[send[0]]])]
            head_cols = batch.buf[send[:1], : batch.offset + FLOW_HASH_BYTES]  # not the whole (64 KiB) row
            sock = pool[int(flow_hash(head_cols, batch.offset, 1)[0] % len(pool))]
            views = batch.views(head=self.head)
            rows = [views[i] for i in send.tolist()]
            calls, before = sock.stats.send_calls, sock.stats.sent
            sock.send_segments(rows, None, self._dsts[int(peer[send[0]])])
            sent = sock.stats.sent - before  # datagrams the kernel took
            self._count("tx_send_calls", sock.stats.send_calls - calls)
        else:
            # Only the columns flow_hash reads: TUN read rows are 64 KiB wide, so a whole-row gather of a
            # batch of small packets would copy megabytes.
            if flow is None:
                head_cols = batch.buf[send, : batch.offset + FLOW_HASH_BYTES]
                which = (flow_hash(head_cols, batch.offset, len(send)) % np.uint32(npool)).astype(np.int64)
            else:
                which = np.full(len(send), flow[1] % npool, np.int64)
            which += np.where(self.table.outer_v6[peer[send]], npool, 0)  # IPv6 underlay: the second pool
            sent = 0
            contiguous = batch.buf.flags.c_contiguous  # iovecs may then be computed from its address
            for s in sorted(set(which.tolist())):
                rows = send[which == s]
                pool = self._pools[s // npool]
                sock = pool[(s % npool) % len(pool)]
                calls, before = sock.stats.send_calls, sock.stats.sent
                peers = peer[rows]
                sizes = lengths[rows]
                if (
                    len(rows) > 1
                    and sock.gso
                    and contiguous
                    and (peers == peers[0]).all()
                    and (sizes == sizes[0]).all()
                ):
                    # One peer, equal sizes (a packet-rate flow): UDP_SEGMENT messages over the rows instead
                    # of a datagram each; the wire carries the same datagrams.
                    seg = int(sizes[0]) + self.head
                    sock.send_rows_gso(
                        batch.buf, rows, batch.offset - self.head, seg, seg, self._dsts[int(peers[0])]
                    )
                elif (peers == peers[0]).all() and contiguous:
                    # One peer (the usual case): iovecs straight from the batch buffer, as arrays.
                    dest = self._dsts[int(peers[0])]
                    sock.send_rows(batch.buf, rows, batch.offset - self.head, sizes + self.head, dest)
                else:
                    views = batch.views(head=self.head)
                    items = [
                        (views[i], self._dsts[p]) for i, p in zip(rows.tolist(), peers.tolist(), strict=True)
                    ]
                    sock.sendmmsg(items)
                sent += sock.stats.sent - before
                self._count("tx_send_calls", sock.stats.send_calls - calls)
        failed = len(send) - sent
        self._count("tx_packets", sent)
        self._count("tx_bytes", int(lengths[send].sum()))
        if failed:
            self.counters[_DROP_SLOT[DropReason.SEND_ERROR]] += failed

    def _answer_drops(self, batch: PacketBatch, codes: np.ndarray) -> None:
        """ICMP back into the TUN for what a router would answer (never for malformed packets)."""
        for i in np.flatnonzero(icmp.answerable(codes)).tolist():
            reply = icmp.answer(bytes(batch.packet(i)), int(codes[i]), self.cfg)
            if reply is not None and self.tun.write_plain(reply):
                self._count("icmp_sent")

    # --- RX -----------------------------------------------------------------------------------------------

    def process_train_set(self, ts: TrainSet) -> None:
        """Several trains from one receive, checked together (packet/gro_trains.py); each that is not a
        clean run of one flow's segments from a peer goes through process_rx alone, in arrival order."""
        merged = self._merge_trains(ts)
        writes = merged.writes if merged is not None else [None] * len(ts.counts)
        head = self.head
        seg = ts.rows.shape[2] - head
        # Whole superpackets in a row (nothing held before them, none to hold) are written as one batch
        # and counted once; anything else goes train by train, in arrival order.
        ready: list[tuple[memoryview]] = []
        packets = nbytes = 0
        for j, (write, k, last) in enumerate(zip(writes, ts.counts.tolist(), ts.lasts.tolist(), strict=True)):
            if write is not None and not self.holding and not self.may_go_on(write):
                ready.append((write,))
                packets += k
                nbytes += last - head + (k - 1) * seg
                continue
            if ready:
                self._count("rx_batches", len(ready))
                self._deliver(ready, packets, nbytes)
                ready, packets, nbytes = [], 0, 0
            if write is None:
                self.receive_train(ts.train(j))
                continue
            self._count("rx_batches")
            # The next train may be the rest of its superpacket; `write` lies in the output arena, which
            # the next train set reuses.
            self.deliver_run(write, k, last - head + (k - 1) * seg, owned=False)
        if ready:
            self._count("rx_batches", len(ready))
            self._deliver(ready, packets, nbytes)

    def _merge_trains(self, ts: TrainSet) -> MergedTrains | None:
        """The outer checks (VXLAN and inner Ethernet headers, peer source) of every train, then
        gro_trains (which also holds every row to row 0's TTL: the udp proxy's TTL rule needs no more).
        VXLAN: row 0 of each train is checked here, and gro_trains holds the train's other rows to it."""
        head = self.head
        if self.is_vxlan:
            expected = self.rx_expected[1 if ts.rows[0, 0, head] >> 4 == 6 else 0]
            if np.count_nonzero((ts.rows[:, 0, : head + 1] ^ expected) & vxlan_codec.EXPECTED_MASK):
                return None
        if self.cfg.check_peer_source and self.table.any_stranger(ts.src_addr):
            return None
        self._train_out = out_arena(len(ts.counts), self._train_out)
        return coalesce_trains(ts.rows, ts.counts, ts.lasts, head, self._train_out, same_prefix=bool(head))

    def few(self, batch: PacketBatch) -> bool:
        """A batch the per-row path (receive_few) tries first: a handful of rows, or some more small ones."""
        n = batch.n
        return n <= FEW_PACKETS or (
            n <= FEW_SMALL_PACKETS and int(batch.lengths[:n].max()) <= SMALL_PACKET + self.head
        )

    def process_rx(self, batch: PacketBatch, src_addr: np.ndarray) -> None:
        """Deliver datagrams (rows of `batch`) from src_addr (uint8 [n, 4]) to the TUN."""
        n = batch.n
        self._count("rx_batches")
        if self.few(batch) and self.receive_few(batch, src_addr):
            return
        if self.tun.vnet and n >= 2 and self.receive_run(batch, src_addr):
            return
        if self.is_vxlan:
            res = vxlan_codec.decode_batch(
                batch.buf,
                batch.lengths[:n],
                batch.offset,
                self.cfg.vni,
                self.mac,
                self.rx_prefix,
                self.rx_expected,
            )
            codes = _VXLAN_DROPS[res]
        else:
            codes = _UDP_DROPS[udp_codec.decode_batch(batch.buf, batch.lengths[:n], batch.offset)]
        if self.cfg.check_peer_source:
            stranger = self.table.strangers(src_addr[:n])
            codes[stranger & (codes == DropReason.NONE)] = DropReason.NOT_A_PEER_SOURCE
        head = self.head
        inner = PacketBatch(batch.buf, batch.lengths[:n] - head, batch.offset + head, n)
        if self.tun.vnet and not codes.any():
            # A train of one flow's segments: validated and coalesced in one pass over the rows.
            writes = coalesce_train(inner)
            if writes is not None:
                self._deliver(writes, n, int(inner.lengths.sum()))
                return
        if codes.any():
            np.maximum(inner.lengths, 0, out=inner.lengths)  # dropped runts: keep lengths sane for validate
        fields = ip_fields(inner)  # shared by validation and coalescing (one widened copy at most)
        checked = validate_ip(inner, l4_checksum=True, fields=fields)
        codes = np.where(codes != DropReason.NONE, codes, checked).astype(np.uint8)
        self._count_drops(codes)
        writes = coalesce(inner, codes, vnet=self.tun.vnet, fields=fields, uso=self._uso)
        keep = codes == DropReason.NONE
        self._deliver(writes, int(keep.sum()), int(inner.lengths[keep].sum()))

    def _deliver(self, writes: list, packets: int, nbytes: int) -> None:
        """Write to the TUN and count: `packets` inner packets of `nbytes` bytes in total."""
        ok = self.tun.write_batch(writes)
        self._count("rx_coalesced_writes", ok)
        if ok == len(writes):
            self._count("rx_packets", packets)
            self._count("rx_bytes", nbytes)
        else:
            # We cannot tell which segments a refused write held; count writes, not guesses.
            self.counters[_DROP_SLOT[DropReason.TUN_WRITE_ERROR]] += len(writes) - ok
