"""The WireGuard datapath engine: TUN <-> codec/wireguard <-> UDP, one batch at a time (run by wg_worker.py).

TX: TUN read (superpackets with IFF_VNET_HDR) -> GSO split / partial checksums finished -> peer lookup
(longest prefix over allowed IPs) -> seal_batch per peer into one preallocated buffer -> one UDP_SEGMENT
sendmsg per peer batch. RX: recvmmsg with UDP_GRO -> open_batch in place (decrypt_into) -> GRO coalesce ->
TUN writes. Handshakes, cookies and timers run here too, since the Noise state lives beside the keys.
The clock is not read here: every call takes `now`.
"""

from __future__ import annotations

import base64
import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from udpflannel.codec.wireguard import messages as wgm
from udpflannel.codec.wireguard.batch import SealedBatch, open_batch, seal_batch
from udpflannel.codec.wireguard.events import Event, HandshakeCompleted, Reply
from udpflannel.codec.wireguard.session import Device
from udpflannel.codec.wireguard.timers import TimerKind
from udpflannel.dataplane.peers import NO_PEER, PeerTable
from udpflannel.dataplane.peers import Peer as TableRow
from udpflannel.io.tun import Tun, new_read_arena
from udpflannel.io.udp import UdpSocket
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.checksum import finish, finish_udp, sum_rows_raw
from udpflannel.packet.gro import coalesce
from udpflannel.packet.gso import split_superpacket
from udpflannel.packet.headers import TCP_CSUM, UDP_CSUM
from udpflannel.packet.parse import validate_ip
from udpflannel.packet.vnet import VIRTIO_NET_HDR_F_NEEDS_CSUM

log = logging.getLogger(__name__)

BATCH = 64  # TUN reads / datagrams per turn
HEADROOM = 32  # in front of every TUN packet: room for the 10-byte virtio header
MAX_BATCHES_PER_WAKE = 16
MAX_ERRORS_LOGGED = 5


@dataclass(frozen=True, slots=True)
class WgPeerConfig:
    """One peer as the worker is told about it by the backend."""

    public_key: bytes
    endpoint: tuple[str, int] | None
    allowed_ips: tuple[str, ...]
    preshared_key: bytes | None = None
    persistent_keepalive: int = 0

    def to_json(self) -> dict:
        return {
            "public_key": base64.b64encode(self.public_key).decode(),
            "endpoint": list(self.endpoint) if self.endpoint else None,
            "allowed_ips": list(self.allowed_ips),
            "psk": base64.b64encode(self.preshared_key).decode() if self.preshared_key else None,
            "keepalive": self.persistent_keepalive,
        }

    @classmethod
    def from_json(cls, obj: dict) -> WgPeerConfig:
        ep = obj.get("endpoint")
        return cls(
            public_key=base64.b64decode(obj["public_key"]),
            endpoint=(str(ep[0]), int(ep[1])) if ep else None,
            allowed_ips=tuple(obj.get("allowed_ips", ())),
            preshared_key=base64.b64decode(obj["psk"]) if obj.get("psk") else None,
            persistent_keepalive=int(obj.get("keepalive") or 0),
        )


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
        # One peer batch: BATCH messages of at most the TUN MTU plus WireGuard's 32 bytes and padding.
        largest = device.mtu or 65535
        self.out = bytearray(BATCH * (largest + wgm.MESSAGE_TRANSPORT_SIZE + wgm.PADDING_MULTIPLE))
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

    # -- TX

    def tx_once(self, now: float) -> int:
        read = self.tun.read_batch(BATCH, HEADROOM, self.arena)
        batch = read.batch
        n = batch.n
        if n == 0:
            return 0
        try:
            headers = read.headers
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
                return n
            # Superpackets are split where they stand, so a flow's packets keep their order.
            start = 0
            for i in np.flatnonzero(gso).tolist():
                if i > start:
                    self._send_rows(batch, start + np.flatnonzero(keep[start:i]), now)
                start = i + 1
                segs = split_superpacket(batch.packet(i), read.header(i), 0)
                if segs.n == 0:
                    self.counters.drops["bad_superpacket"] += 1
                    continue
                self._send_rows(segs, np.arange(segs.n), now)
            if start < n:
                self._send_rows(batch, start + np.flatnonzero(keep[start:]), now)
        except Exception:  # a bug must not stop the datapath: drop the batch, count it
            self._internal_error(n)
        return n

    def _send_rows(self, batch: PacketBatch, rows: np.ndarray, now: float) -> None:
        """Seal and send batch rows `rows` (in order), grouped by the peer their destination routes to."""
        if len(rows) == 0:
            return
        peer_of = self.table.lookup_packets(batch.buf, batch.offset, batch.n)[rows]
        unknown = peer_of == NO_PEER
        if unknown.any():
            self.counters.drops["unknown_peer"] += int(unknown.sum())
        keys = self.row_keys
        views = batch.views()  # memoryview slices of one flat view: cheaper than a numpy slice per row
        first = int(peer_of[0])
        if first != NO_PEER and (peer_of == first).all():
            # One destination (always so for a split superpacket): no per-packet grouping.
            self._seal_and_send(keys[first], views if len(rows) == batch.n else [views[i] for i in rows], now)
            return
        groups: dict[bytes, list[memoryview]] = {}
        for i, row in zip(rows.tolist(), peer_of.tolist(), strict=True):
            if row != NO_PEER:
                groups.setdefault(keys[row], []).append(views[i])
        for key, segs in groups.items():
            self._seal_and_send(key, segs, now)

    def _seal_and_send(self, key: bytes, segs: list[memoryview], now: float) -> None:
        for start in range(0, len(segs), BATCH):
            # BATCH segments of at most the TUN MTU always fit self.out (sized in __init__).
            chunk = segs[start : start + BATCH]
            res = seal_batch(self.device, key, chunk, self.out, now)
            if not isinstance(res, SealedBatch):
                continue  # Queued (handshake on its way) or Drop (counted by the device)
            if res.endpoint is None:
                self.counters.drops["no_endpoint"] += len(chunk)
                continue
            mv = memoryview(self.out)
            out_views, pos = [], 0
            for size in res.sizes:
                out_views.append(mv[pos : pos + size])
                pos += size
            calls_before, sent_before = self.udp.stats.send_calls, self.udp.stats.sent
            self.udp.send_segments(out_views, res.sizes[0], res.endpoint)
            # Datagrams the kernel took, from the socket's own count (one per segment, GSO or not).
            sent = self.udp.stats.sent - sent_before
            self.counters.tx_send_calls += self.udp.stats.send_calls - calls_before
            self.counters.tx_packets += sent
            self.counters.tx_bytes += sum(len(s) for s in chunk)
            if sent < len(chunk):
                self.counters.drops["send_error"] += len(chunk) - sent

    # -- RX

    def rx_once(self, now: float) -> int:
        rcv = self.udp.recv_batch(BATCH)
        b = rcv.batch
        n = b.n
        if n == 0:
            return 0
        try:
            self._receive(rcv, now)
        except Exception:  # a bug must not stop the datapath: drop the batch, count it
            self._internal_error(n)
        return n

    def _receive(self, rcv, now: float) -> None:
        b = rcv.batch
        n = b.n
        views = b.views()
        # Runs of datagrams from one source share one open_batch call (GRO trains always do).
        addr = rcv.src_addr.reshape(n, -1)
        same = np.ones(n, bool)
        same[1:] = (addr[1:] == addr[:-1]).all(axis=1) & (rcv.src_port[1:] == rcv.src_port[:-1])
        starts = [*np.flatnonzero(~same | (np.arange(n) == 0)).tolist(), n]
        rows: list[int] = []
        lengths: list[int] = []
        events: list[Event] = []
        for a, z in itertools.pairwise(starts):
            opened = open_batch(self.device, views[a:z], rcv.source(a), now)
            events.extend(opened.events)
            rows.extend(a + i for i in opened.indices)
            lengths.extend(len(v) for _, v in opened.delivered)
        if events:
            self.send_events(events)
        if not rows:
            return
        inner = self._inner_batch(b, rows, lengths)
        if self.tun.vnet:
            # GRO needs verified L4 checksums: the kernel trusts a coalesced NEEDS_CSUM packet.
            codes = validate_ip(inner, l4_checksum=True)
            bad = int(np.count_nonzero(codes))
            if bad:
                self.counters.drops["bad_inner_packet"] += bad
            writes = coalesce(inner, codes, vnet=True, gro=True)
        else:
            bad = 0
            writes = [(v,) for v in inner.views()]
        ok = self.tun.write_batch(writes)
        self.counters.tun_writes += ok
        if ok < len(writes):
            self.counters.drops["tun_write_error"] += len(writes) - ok
        self.counters.rx_packets += len(rows) - bad
        self.counters.rx_bytes += int(sum(lengths))

    @staticmethod
    def _inner_batch(b: PacketBatch, rows: list[int], lengths: list[int]) -> PacketBatch:
        """The decrypted inner packets as a batch, in place behind the 16-byte transport header."""
        offset = b.offset + wgm.MESSAGE_TRANSPORT_OFFSET_CONTENT
        idx = np.asarray(rows, np.intp)
        buf = b.buf[: len(rows)] if np.array_equal(idx, np.arange(len(rows))) else b.buf[idx]
        return PacketBatch(buf, np.asarray(lengths, np.int32), offset, len(rows))

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
        if items:
            self.udp.sendmmsg(items)

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


def warm_up() -> None:
    """One handshake and one transport message between two throwaway devices, so the first real handshake
    does not pay for first-use costs (crypto contexts, code paths): it is the latency a peer sees."""
    from udpflannel.codec.wireguard import crypto

    keys = [crypto.generate_private_key(os.urandom(32)) for _ in range(2)]
    a, b = Device(keys[0]), Device(keys[1])
    a.add_peer(b.identity.public, endpoint=("198.18.0.2", 1))
    b.add_peer(a.identity.public, endpoint=("198.18.0.1", 1))
    init = a.initiate(b.identity.public, 0.0)
    resp = b.receive_datagram(init[0].data, ("198.18.0.1", 1), 0.0) if init else []
    if resp and isinstance(resp[0], Reply):
        a.receive_datagram(resp[0].data, ("198.18.0.2", 1), 0.0)
    packet = bytes([0x45, 0, 0, 20]) + bytes(16)
    out = bytearray(256)
    sealed = seal_batch(a, b.identity.public, [packet], out, 0.0)
    if isinstance(sealed, SealedBatch):
        open_batch(b, [memoryview(out)[: sealed.sizes[0]]], ("198.18.0.1", 1), 0.0)


def format_endpoint(endpoint: tuple | None) -> str | None:
    """host:port as wg(8) prints it ([v6]:port for IPv6)."""
    if endpoint is None:
        return None
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def finish_partial_checksums(batch: PacketBatch, headers: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Finish the L4 checksum of non-GSO NEEDS_CSUM rows in place, one array pass per csum_start value
    (the batch twin of packet.gso's single-packet path). Returns, per row, True where the header was
    unusable (the row must be dropped)."""
    start = headers["csum_start"][rows].astype(np.int64)
    field_off = headers["csum_offset"][rows].astype(np.int64)
    lengths = batch.lengths[rows].astype(np.int64)
    ok = ((field_off == TCP_CSUM) | (field_off == UDP_CSUM)) & (start + field_off + 2 <= lengths)
    off = batch.offset
    for s in np.unique(start[ok]).tolist():
        sel = ok & (start == s)
        idx = rows[sel]
        span = lengths[sel] - s
        # The field holds the pseudo-header sum, so the sum over [csum_start, end) is the whole sum.
        sums = sum_rows_raw(batch.buf[idx, off + s : off + s + int(span.max())], span)
        is_udp = field_off[sel] == UDP_CSUM
        c = np.where(is_udp, finish_udp(sums), finish(sums))
        col = off + s + field_off[sel]
        batch.buf[idx, col] = (c >> 8).astype(np.uint8)
        batch.buf[idx, col + 1] = (c & 0xFF).astype(np.uint8)
    return ~ok
