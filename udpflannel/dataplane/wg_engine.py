"""The WireGuard datapath engine: TUN <-> codec/wireguard <-> UDP, one batch at a time (run by wg_worker.py).

TX: TUN read (superpackets with IFF_VNET_HDR) -> GSO split / partial checksums finished -> peer lookup
(longest prefix over allowed IPs, cached per destination) -> rows.seal_rows per peer: headers, counters,
nonces and padding as array operations, encrypt_into in place, equal-size messages back to back in one
preallocated buffer -> one UDP_SEGMENT sendmsg of that buffer. RX: recvmmsg with UDP_GRO into our own
arena -> each train opened in place on its (datagrams, segment size) view (rows.open_rows: one index
lookup, one replay-window update, inner checks as arrays) -> packet.gro.coalesce validates and merges ->
TUN writes. The only per-packet Python work on either path is the AEAD call. A batch of at most FEW
packets (pings, ACKs, handshakes) takes a plain per-packet path instead: a dozen array operations cost
more than the packets. Handshakes, cookies and timers run here too, since the Noise state lives beside
the keys. The clock is not read here: every call takes `now`.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from udpflannel.codec.wireguard import messages as wgm
from udpflannel.codec.wireguard.batch import SealedBatch, open_batch, seal_batch
from udpflannel.codec.wireguard.events import Event, HandshakeCompleted, Reply
from udpflannel.codec.wireguard.rows import OpenedRows, SealedRows, ViewCache, open_rows, seal_rows
from udpflannel.codec.wireguard.session import Device
from udpflannel.codec.wireguard.timers import TimerKind
from udpflannel.dataplane.peers import NO_PEER, PeerTable
from udpflannel.dataplane.peers import Peer as TableRow
from udpflannel.dataplane.wg_config import WgPeerConfig, format_endpoint
from udpflannel.dataplane.wg_io import (
    finish_partial_checksums,
    message_sizes,
    message_sizes_few,
    packets_in_writes,
    send_contiguous,
    send_one,
)
from udpflannel.io.mmsg import MmsgArena, decode_sockaddr
from udpflannel.io.tun import Tun, TunRead, new_read_arena
from udpflannel.io.udp import UdpSocket
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.gro import coalesce
from udpflannel.packet.gso import split_superpacket
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    ZERO_VNET_HDR,
    VnetHdr,
)

log = logging.getLogger(__name__)

BATCH = 64  # TUN reads / datagrams per turn
HEADROOM = 32  # in front of every TUN packet: room for the 10-byte virtio header
MAX_BATCHES_PER_WAKE = 16
MAX_ERRORS_LOGGED = 5
FEW = 4  # packets up to which a per-packet Python path beats a dozen array operations
MIN_TRAIN = 4  # datagrams in a UDP_GRO train from which open_rows beats open_batch
RX_SLOT = 65536 + 9216  # a 64 KiB train plus one jumbo datagram
CACHED_MIN_SEGMENT = 512  # trains of smaller datagrams (ACKs) are opened without the view cache
CACHED_SLOTS = 4
MAX_CACHED = 4096  # entries of the source and route caches before they are cleared


@dataclass
class EngineCounters:
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_send_calls: int = 0
    tun_writes: int = 0
    handshakes: int = 0
    drops: Counter = field(default_factory=Counter)  # datapath drops that are not the codec's


class WgEngine:
    """Owns the Device and the peer table; the I/O objects are given (so tests may pass fakes)."""

    def __init__(self, device: Device, tun: Tun, udp: UdpSocket) -> None:
        self.device = device
        self.tun = tun
        self.udp = udp
        self.table = PeerTable([])
        self.row_keys: list[bytes] = []
        self.counters = EngineCounters()
        self.arena = new_read_arena(BATCH, HEADROOM)
        # Receive slots as wide as a UDP_GRO train plus one datagram, so a train's shorter tail is the last
        # row of its (k, segment size) view. Pages are only touched when used.
        self.rx_arena = MmsgArena(BATCH, RX_SLOT)
        self._rx_flat = memoryview(self.rx_arena.data.reshape(-1))
        self.rx_views = ViewCache(self.rx_arena.data, RX_SLOT // CACHED_MIN_SEGMENT + 1)
        self._rx_ctl = memoryview(self.rx_arena.control.reshape(-1))
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
        read = self.tun.read_batch(BATCH, HEADROOM, self.arena)
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
            refused = finish_partial_checksums(batch, headers, rows)
            keep[rows[refused]] = False
            if refused.any():
                self.counters.drops["bad_header"] += int(refused.sum())
        if not gso.any():
            self._send_rows(batch, np.flatnonzero(keep), now)
            return
        # Superpackets are split where they stand, so a flow's packets keep their order.
        start = 0
        for i in np.flatnonzero(gso).tolist():
            if i > start:
                self._send_rows(batch, start + np.flatnonzero(keep[start:i]), now)
            start = i + 1
            self._send_superpacket(read, i, now)
        if start < n:
            self._send_rows(batch, start + np.flatnonzero(keep[start:]), now)

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
        for i, hdr in enumerate(read.headers.tolist()):
            flags, gso_type = hdr[0], hdr[1]
            if gso_type == VIRTIO_NET_HDR_GSO_NONE and not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                plain.append(batch.packet(i))
                continue
            self._send_few(plain, now)
            plain = []
            if gso_type != VIRTIO_NET_HDR_GSO_NONE:
                self._send_superpacket(read, i, now)
                continue
            one = split_superpacket(batch.packet(i), VnetHdr(*hdr), 0)  # finishes the partial checksum
            if one.n == 0:
                self.counters.drops["bad_header"] += 1
                continue
            self._send_few([one.packet(0)], now)
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
                sent = send_one(self.udp, mv[pos : pos + size], res.endpoint)
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
            probe = np.zeros((1, 40), np.uint8)
            probe[0] = np.frombuffer(pkt[:40].tobytes().ljust(40, b"\0"), np.uint8)
            row = self._routes[key] = int(self.table.lookup_packets(probe, 0, 1)[0])
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
                sent = send_contiguous(self.udp, res.flat, res.stride, res.endpoint)
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

    # -- RX

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
        total, seg, counts = (
            message_sizes(arena, udp, m) if m > FEW else message_sizes_few(arena, udp, self._rx_ctl, m)
        )
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
                    self._deliver_rows(rows, opened)
                    continue
            base = j * slot
            pending.extend((flat[base + a : base + min(a + s, t)], src) for a in range(0, t, s))
        self._open_views(pending, now)

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
        if self.tun.vnet:
            # coalesce validates (L4 checksums included: the kernel trusts a coalesced NEEDS_CSUM packet)
            # and leaves out what fails; what it left out is counted from what it wrote.
            writes = coalesce(inner, None, vnet=True, gro=True)
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
            send_one(self.udp, memoryview(data), endpoint)

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
            "handshakes": c.handshakes,
            **drops,
            "peers": peers,
        }
