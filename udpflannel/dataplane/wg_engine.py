"""The WireGuard datapath engine: TUN <-> codec/wireguard <-> UDP, one batch at a time (run by wg_worker.py).

TX: TUN read (superpackets with IFF_VNET_HDR) -> GSO split / partial checksums finished -> peer lookup
(longest prefix over allowed IPs, cached per destination) -> rows.seal_rows per peer: headers, counters,
nonces and padding as array operations, encrypt_into in place, equal-size messages back to back in one
preallocated buffer -> one UDP_SEGMENT sendmsg of that buffer. RX (wg_rx.py): recvmmsg with UDP_GRO into
our own arena -> each train opened in place on its (datagrams, segment size) view (rows.open_rows: one
index lookup, one replay-window update, inner checks as arrays) -> packet.gro.coalesce validates and
merges (several trains of one receive together: packet.gro_trains) -> TUN writes. The only per-packet
Python work on either path is the AEAD call. A batch of at most FEW packets (pings, ACKs, handshakes)
takes a plain per-packet path instead: a dozen array operations cost more than the packets. Handshakes,
cookies and timers run here too, since the Noise state lives beside the keys. The clock is not read here:
every call takes `now`.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from udpflannel.codec.wireguard import messages as wgm
from udpflannel.codec.wireguard.batch import SealedBatch, seal_batch
from udpflannel.codec.wireguard.events import Event, HandshakeCompleted, Reply
from udpflannel.codec.wireguard.rows import SealedRows, ViewCache, seal_rows
from udpflannel.codec.wireguard.session import Device
from udpflannel.codec.wireguard.timers import TimerKind
from udpflannel.dataplane.peers import NO_PEER, PeerTable
from udpflannel.dataplane.peers import Peer as TableRow
from udpflannel.dataplane.txprep import finish_partial, finish_partial_checksums
from udpflannel.dataplane.wg_config import WgPeerConfig, format_endpoint
from udpflannel.dataplane.wg_io import (
    BATCH,
    FEW,
    HEADROOM,
    MAX_CACHED,
)
from udpflannel.dataplane.wg_rx import CACHED_MIN_SEGMENT, CACHED_SLOTS, WgReceiver
from udpflannel.io.mmsg import MmsgArena
from udpflannel.io.tun import Tun, TunRead, new_read_arena
from udpflannel.io.udp import UdpSocket
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gso import split_superpacket
from udpflannel.packet.gso_many import SPLIT_MANY_MIN, split_many
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
)

log = logging.getLogger(__name__)

MAX_BATCHES_PER_WAKE = 16
MAX_ERRORS_LOGGED = 5
RX_SLOT = 65536 + 9216  # a 64 KiB train plus one jumbo datagram


@dataclass
class EngineCounters:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_send_calls: int = 0
    tun_writes: int = 0
    joined_runs: int = 0  # superpackets that came as two UDP_SEGMENT messages, received as one train
    handshakes: int = 0
    drops: Counter = field(default_factory=Counter)  # datapath drops that are not the codec's


class WgEngine(WgReceiver):
    """Owns the Device and the peer table; the I/O objects are given (so tests may pass fakes)."""

    def __init__(self, device: Device, tun: Tun, udp: UdpSocket) -> None:
        self.device = device
        self.tun = tun
        self.udp = udp
        self.table = PeerTable([])
        self.row_keys: list[bytes] = []
        self.counters = EngineCounters()
        self.arena = new_read_arena(BATCH, HEADROOM)
        self.tx_drained = True  # the last tx_once emptied the TUN queue (the worker then waits in poll)
        # Receive slots as wide as a UDP_GRO train plus one datagram, so a train's shorter tail is the last
        # row of its (k, segment size) view. Pages are only touched when used.
        self.rx_arena = MmsgArena(BATCH, RX_SLOT)
        self._rx_flat = memoryview(self.rx_arena.data.reshape(-1))
        self._train_out: np.ndarray | None = None  # gro_trains output arena, grown on demand
        self.rx_views = ViewCache(
            self.rx_arena.data, RX_SLOT // CACHED_MIN_SEGMENT + 1, max_layouts=2 * CACHED_SLOTS
        )
        self._sources: dict[bytes, tuple] = {}
        self._routes: dict[bytes, int] = {}
        # One peer batch: BATCH messages of at most the TUN MTU plus WireGuard's 32 bytes and padding.
        largest = device.mtu or 65535
        self.out = np.empty(BATCH * (largest + wgm.MESSAGE_TRANSPORT_SIZE + wgm.PADDING_MULTIPLE), np.uint8)
        self.tx_views = ViewCache(self.out, BATCH)
        self._errors_logged = 0

    # -- peers

    def set_peers(self, peers: list[WgPeerConfig], now: float) -> None:
        """Reconcile the device's peers with `peers` (keys kept when a peer stays) and rebuild the table."""
        wanted = {p.public_key: p for p in peers}
        for key in list(self.device.peers):
            if key not in wanted:
                self.device.remove_peer(key)
        rows: list[TableRow] = []
        keys: list[bytes] = []
        for key, cfg in wanted.items():
            peer = self.device.peers.get(key)
            if peer is None:
                peer = self.device.add_peer(
                    key,
                    preshared_key=cfg.preshared_key,
                    endpoint=cfg.endpoint,
                    persistent_keepalive=cfg.persistent_keepalive,
                    allowed_ips=cfg.allowed_ips,
                )
                if cfg.persistent_keepalive:
                    # As wireguard-go when the interval is set: a keepalive now (which starts a handshake).
                    peer.timers.arm(TimerKind.PERSISTENT_KEEPALIVE, now)
            else:
                if cfg.endpoint is not None:
                    peer.endpoint = cfg.endpoint
                peer.handshake.preshared_key = cfg.preshared_key or bytes(32)
                peer.timers.persistent_keepalive_interval = cfg.persistent_keepalive
                peer.set_allowed_ips(cfg.allowed_ips)
            for cidr in cfg.allowed_ips:
                rows.append(TableRow(cidr, cfg.endpoint[0] if cfg.endpoint else "0.0.0.0"))
                keys.append(key)
        self.table = PeerTable(rows)
        self.row_keys = keys
        self._routes.clear()

    # -- TX

    def tx_once(self, now: float) -> int:
        """Read one batch from the TUN and send it; returns TUN reads done. tx_drained tells whether the
        read found the queue empty."""
        read = self.tun.read_batch(BATCH, HEADROOM, self.arena)
        self.tx_drained = read.drained
        batch = read.batch
        n = batch.n
        if n == 0:
            return 0
        try:
            if n <= FEW:
                self._tx_few(read, now)
            else:
                self._tx_many(read, now)
        except Exception:  # a bug must not stop the datapath: drop the batch, count it
            self._internal_error(n)
        return n

    def _tx_many(self, read: TunRead, now: float) -> None:
        batch, headers, n = read.batch, read.headers, read.batch.n
        gso = headers["gso_type"] != 0
        partial = ((headers["flags"] & VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0) & ~gso
        keep = np.ones(n, bool)
        if partial.any():
            rows = np.flatnonzero(partial)
            refused = finish_partial_checksums(batch, headers, rows) != 0
            keep[rows[refused]] = False
            if refused.any():
                self.counters.drops["bad_header"] += int(refused.sum())
        if not gso.any():
            self._send_rows(batch, np.flatnonzero(keep), now)
            return
        # Superpackets are split where they stand (a run of them together), so a flow's packets keep
        # their order.
        start = 0
        run: list[int] = []
        for i in np.flatnonzero(gso).tolist():
            if run and i != run[-1] + 1:
                self._send_superpackets(read, run, now)
                run = []
            if i > start:
                self._send_rows(batch, start + np.flatnonzero(keep[start:i]), now)
            start = i + 1
            run.append(i)
        self._send_superpackets(read, run, now)
        if start < n:
            self._send_rows(batch, start + np.flatnonzero(keep[start:]), now)

    def _send_superpackets(self, read: TunRead, rows: list[int], now: float) -> None:
        """Consecutive superpackets of a TUN read: split together (packet/gso_many) when there are enough
        of one shape, each then sealed and sent as its own flow's batch; else one by one."""
        if len(rows) >= SPLIT_MANY_MIN:
            many = split_many(read.batch, read.headers, np.array(rows), 0)
            if many is not None:
                for segs in many.parts():
                    self._send_rows(segs, np.arange(segs.n), now, one_flow=True)
                return
        for i in rows:
            self._send_superpacket(read, i, now)

    def _send_superpacket(self, read: TunRead, i: int, now: float) -> None:
        segs = split_superpacket(read.batch.packet(i), read.header(i), 0)
        if segs.n == 0:
            self.counters.drops["bad_superpacket"] += 1
            return
        self._send_rows(segs, np.arange(segs.n), now, one_flow=True)

    def _tx_few(self, read: TunRead, now: float) -> None:
        """A few packets (pings, ACKs, a lone superpacket): decided row by row in plain Python, plain rows
        sealed per packet (seal_batch) and sent with one sendto each."""
        batch = read.batch
        plain: list[memoryview] = []
        run: list[int] = []  # consecutive superpackets, sent together
        for i, hdr in enumerate(read.headers.tolist()):
            flags, gso_type = hdr[0], hdr[1]
            if gso_type == VIRTIO_NET_HDR_GSO_NONE:
                if run:
                    self._send_superpackets(read, run, now)
                    run = []
                pkt = batch.packet(i)
                if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not finish_partial(pkt, hdr[4], hdr[5]):
                    self.counters.drops["bad_header"] += 1
                    continue
                plain.append(pkt)
                continue
            self._send_few(plain, now)
            plain = []
            run.append(i)
        self._send_superpackets(read, run, now)
        self._send_few(plain, now)

    def _send_few(self, packets: list[memoryview], now: float) -> None:
        groups: dict[int, list[memoryview]] = {}
        for pkt in packets:
            row = self._route(pkt)
            if row == NO_PEER:
                self.counters.drops["unknown_peer"] += 1
                continue
            groups.setdefault(row, []).append(pkt)
        for row, segs in groups.items():
            res = seal_batch(self.device, self.row_keys[row], segs, self.out, now)
            if not isinstance(res, SealedBatch):
                continue  # Queued (handshake on its way) or Drop (counted by the device)
            if res.endpoint is None:
                self.counters.drops["no_endpoint"] += len(segs)
                continue
            mv = memoryview(self.out)
            pos = 0
            for seg, size in zip(segs, res.sizes, strict=True):
                sent = self.udp.send_one(mv[pos : pos + size], res.endpoint)
                pos += size
                self.counters.tx_send_calls += 1
                self.counters.tx_packets += sent
                self.counters.tx_bytes += len(seg)
                if not sent:
                    self.counters.drops["send_error"] += 1

    def _route(self, pkt: memoryview) -> int:
        """The peer row of a packet's destination, through a cache keyed by the address bytes."""
        version = pkt[0] >> 4 if len(pkt) else 0
        if version == 4 and len(pkt) >= 20:
            key = bytes(pkt[16:20])
        elif version == 6 and len(pkt) >= 40:
            key = bytes(pkt[24:40])
        else:
            return NO_PEER
        row = self._routes.get(key)
        if row is None:
            if len(self._routes) >= MAX_CACHED:
                self._routes.clear()
            row = self._routes[key] = self.table.lookup_one(pkt[:40])
        return row

    def _send_rows(self, batch: PacketBatch, rows: np.ndarray, now: float, *, one_flow: bool = False) -> None:
        """Seal and send batch rows `rows` (in order), grouped by the peer their destination routes to.
        `one_flow`: every row has the first row's destination (a split superpacket): one lookup."""
        if len(rows) == 0:
            return
        if one_flow:
            peer_of = np.array([self._route(batch.packet(0))], np.int32)
        else:
            peer_of = self.table.lookup_packets(batch.buf, batch.offset, batch.n)[rows]
        first = int(peer_of[0])
        everything = len(rows) == batch.n
        if one_flow or (first != NO_PEER and (peer_of == first).all()):
            if first == NO_PEER:
                self.counters.drops["unknown_peer"] += len(rows)
                return
            # One destination (always so for a split superpacket): no per-packet grouping.
            self._seal_and_send(self.row_keys[first], batch, None if everything else rows, now)
            return
        unknown = peer_of == NO_PEER
        if unknown.any():
            self.counters.drops["unknown_peer"] += int(unknown.sum())
        for row in np.unique(peer_of[~unknown]).tolist():
            self._seal_and_send(self.row_keys[row], batch, rows[peer_of == row], now)

    def _seal_and_send(self, key: bytes, batch: PacketBatch, index: np.ndarray | None, now: float) -> None:
        """Batch rows `index` (all rows if None) to one peer: sealed BATCH at a time into self.out, each chunk
        sent as one contiguous UDP_SEGMENT buffer when its messages are equal-size."""
        lengths = batch.lengths[: batch.n] if index is None else batch.lengths[index]
        total = len(lengths)
        for start in range(0, total, BATCH):
            # BATCH segments of at most the TUN MTU always fit self.out (sized in __init__).
            stop = min(start + BATCH, total)
            if index is None:
                buf, pick = batch.buf[start:stop], None
            else:
                buf, pick = batch.buf, index[start:stop]
            res = seal_rows(
                self.device, key, buf, batch.offset, lengths[start:stop], self.out, now, pick, self.tx_views
            )
            if not isinstance(res, SealedRows):
                continue  # Queued (handshake on its way) or Drop (counted by the device)
            count = stop - start
            if res.endpoint is None:
                self.counters.drops["no_endpoint"] += count
                continue
            calls_before = self.udp.stats.send_calls
            if res.contiguous:
                sent = self.udp.send_packed(res.flat, res.stride, res.endpoint)
            else:
                flat = memoryview(res.rows.reshape(-1))
                stride = res.stride
                views = [flat[i * stride : i * stride + z] for i, z in enumerate(res.sizes)]
                sent = self.udp.send_segments(views, None, res.endpoint)
            self.counters.tx_send_calls += self.udp.stats.send_calls - calls_before
            self.counters.tx_packets += sent
            self.counters.tx_bytes += int(lengths[start:stop].sum())
            if sent < count:
                self.counters.drops["send_error"] += count - sent

    # -- handshake traffic and timers

    def send_events(self, events: list[Event]) -> None:
        items = []
        for ev in events:
            if isinstance(ev, HandshakeCompleted):
                self.counters.handshakes += 1
            elif isinstance(ev, Reply) and ev.endpoint is not None:
                items.append((ev.data, (ev.endpoint[0], int(ev.endpoint[1]))))
                if len(ev.data) > wgm.MESSAGE_KEEPALIVE_SIZE and ev.data[0] == wgm.MESSAGE_TRANSPORT_TYPE:
                    self.counters.tx_packets += 1  # a staged packet flushed after a handshake
        if len(items) > FEW:
            self.udp.sendmmsg(items)
            return
        for data, endpoint in items:  # handshake messages: one sendto each beats building a sendmmsg
            self.udp.send_one(memoryview(data), endpoint)

    def run_timers(self, now: float) -> None:
        deadline = self.device.next_timer()
        if deadline is not None and deadline <= now:
            self.send_events(self.device.handle_timer(now))

    def _internal_error(self, n: int) -> None:
        self.counters.drops["internal_error"] += n
        if self._errors_logged < MAX_ERRORS_LOGGED:
            self._errors_logged += 1
            log.exception("wireguard datapath bug: batch of %d dropped", n)

    # -- stats

    def stats(self, wall_offset: float) -> dict:
        c = self.counters
        drops = {f"drop_{r.value}": v for r, v in self.device.drops.items()}
        drops.update({f"drop_{k}": v for k, v in c.drops.items()})
        peers = []
        for key, peer in self.device.peers.items():
            hs = peer.stats.last_handshake
            peers.append(
                {
                    "public_key": base64.b64encode(key).decode(),
                    "endpoint": format_endpoint(peer.endpoint),
                    "allowed_ips": [str(n) for n in peer.allowed_ips],
                    "latest_handshake": hs + wall_offset if hs is not None else None,
                    "rx_bytes": peer.stats.rx_bytes,
                    "tx_bytes": peer.stats.tx_bytes,
                    "persistent_keepalive": peer.timers.persistent_keepalive_interval,
                }
            )
        return {
            "public_key": base64.b64encode(self.device.identity.public).decode(),
            "tx_packets": c.tx_packets,
            "tx_bytes": c.tx_bytes,
            "rx_packets": c.rx_packets,
            "rx_bytes": c.rx_bytes,
            "tx_send_calls": c.tx_send_calls,
            "tun_writes": c.tun_writes,
            "rx_joined_runs": c.joined_runs,
            "handshakes": c.handshakes,
            **drops,
            "peers": peers,
        }
