"""The datapath engine: TX (TUN -> peer lookup -> encapsulate -> UDP) and RX (UDP -> decapsulate -> validate
-> TUN), one batch at a time, for the vxlan and udp encapsulations.

Per batch, the decisions (peer lookup, size and header checks, header writes) are numpy over all rows; only
the I/O is per packet in the plain path. Every refused packet is counted under a named reason, and a failure
inside a batch drops that batch (counted as internal_error), never the loop. The clock is not read here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from udpflannel.codec import udp as udp_codec
from udpflannel.codec import vxlan as vxlan_codec
from udpflannel.dataplane import icmp
from udpflannel.dataplane.counters import INDEX
from udpflannel.dataplane.peers import NO_PEER, Peer, PeerTable
from udpflannel.packet.batch import PacketBatch

log = logging.getLogger(__name__)

MAX_ERRORS_LOGGED = 5
BATCH = 64  # packets per read/recv batch in per-packet mode
STRIDE = 2048  # bytes per row: headroom + the largest datagram we accept (underlay MTU 1500 + slack)
HEADROOM = 64

_VXLAN_CODES = {
    vxlan_codec.BAD_HEADER: "drop_bad_header",
    vxlan_codec.BAD_VNI: "drop_bad_vni",
    vxlan_codec.WRONG_DST_MAC: "drop_wrong_dst_mac",
    vxlan_codec.BAD_ETHERTYPE: "drop_bad_ethertype",
}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What a worker needs to know; built by the backend, sent to the worker as JSON."""

    encap: str  # "vxlan" or "udp"
    mtu: int  # inner MTU of the tunnel (TUN MTU)
    port: int  # destination UDP port at peers
    vni: int = vxlan_codec.VXLAN_DEFAULT_VNI
    vtep_mac: str = "00:00:00:00:00:00"
    icmp_src_v4: str | None = None  # our TUN address: source of ICMP errors we generate
    icmp_src_v6: str | None = None
    check_peer_source: bool = True

    def to_json(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, obj: dict) -> EngineConfig:
        return cls(**{k: v for k, v in obj.items() if k in cls.__dataclass_fields__})


def flow_hash(buf: np.ndarray, offset: int, n: int) -> np.ndarray:
    """A uint32 hash per packet over addresses, protocol and the first 4 L4 bytes (ports): one flow, one hash.

    Assumes no IPv4 options / IPv6 extension headers for the port bytes, which only weakens the spread.
    """
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    rows = buf[:n, offset : offset + 44].astype(np.uint32)
    is_v6 = (rows[:, 0] >> 4) == 6
    h = np.full(n, 2166136261, dtype=np.uint32)
    v4_cols = [9, *range(12, 24)]
    v6_cols = [6, *range(8, 44)]
    for cols, mask in ((v4_cols, ~is_v6), (v6_cols, is_v6)):
        if not mask.any():
            continue
        part = np.full(int(mask.sum()), 2166136261, dtype=np.uint32)
        for c in cols:
            part = (part ^ rows[mask, c]) * np.uint32(16777619)  # FNV-1a, wrapping uint32
        h[mask] = part
    return h


class Engine:
    """Owns the peer table and the per-batch pipelines; I/O objects are given (plain or offloaded)."""

    def __init__(self, cfg: EngineConfig, tun, udp, counters: np.ndarray) -> None:
        self.cfg = cfg
        self.tun = tun
        self.udp = udp
        self.counters = counters
        self.table = PeerTable()
        self.is_vxlan = cfg.encap == "vxlan"
        self.headroom = vxlan_codec.VXLAN_HEADROOM if self.is_vxlan else 0
        self.mac = vxlan_codec.parse_mac(cfg.vtep_mac)
        self.template = vxlan_codec.vxlan_header_template(cfg.vni, self.mac)
        self.tx_batch = PacketBatch.empty(BATCH, STRIDE, HEADROOM)
        self.rx_batch = PacketBatch.empty(BATCH, STRIDE, HEADROOM)
        self._peer_dsts: list[tuple[str, int]] = []
        self._errors_logged = 0

    def _count(self, name: str, value: int = 1) -> None:
        self.counters[INDEX[name]] += value

    def set_peers(self, peers: list[Peer]) -> None:
        """Swap in a new peer table (between batches, so traffic does not stop)."""
        self.table = PeerTable(peers)
        self._peer_dsts = [(ip, self.cfg.port) for ip in self.table.public_ips]
        self._count("peer_updates")

    # --- TX -----------------------------------------------------------------------------------------------

    def tx_once(self) -> int:
        """Read one batch from the TUN and send it; returns packets read (0: nothing waiting)."""
        batch = self.tx_batch
        n = self.tun.read_batch(batch, BATCH)
        if n == 0:
            return 0
        try:
            self.process_tx(batch)
        except Exception:  # a bug must not stop the datapath: drop the batch, count it
            self._internal_error(n)
        return n

    def _internal_error(self, n: int) -> None:
        self._count("drop_internal_error", n)
        if self._errors_logged < MAX_ERRORS_LOGGED:  # enough to debug, never a log flood
            self._errors_logged += 1
            log.exception("datapath bug: batch of %d packets dropped", n)

    def plan_tx(self, batch: PacketBatch) -> tuple[np.ndarray, np.ndarray]:
        """Decide per packet: (peer index or NO_PEER, reason name index into _TX_REASONS; 0 = send)."""
        n = batch.n
        off = batch.offset
        lens = batch.lengths[:n]
        version = batch.buf[:n, off] >> 4
        bad = ~((version == 4) & (lens >= 20)) & ~((version == 6) & (lens >= 40))
        peer = self.table.lookup_packets(batch.buf, off, n)
        reason = np.zeros(n, dtype=np.uint8)
        reason[lens > self.cfg.mtu] = TX_TOO_BIG
        reason[peer == NO_PEER] = TX_UNKNOWN_PEER
        reason[bad] = TX_BAD_HEADER
        return peer, reason

    def process_tx(self, batch: PacketBatch) -> None:
        n = batch.n
        peer, reason = self.plan_tx(batch)
        if not self.is_vxlan:
            # flannel's udp proxy routes like a router: TTL goes down by one on the way out.
            expired = udp_codec.decrement_ttl_batch(
                batch.buf, batch.lengths[:n], batch.offset, reason == TX_OK
            )
            reason[expired] = TX_TTL_EXCEEDED
        if reason.any():
            self._answer_tx_drops(batch, reason)
        send = np.flatnonzero(reason == TX_OK)
        if len(send) == 0:
            return
        peer_s = peer[send]
        if self.is_vxlan:
            # Headers go into every row's headroom (dropped rows too: harmless), one vectorised write.
            macs = self.table.macs[np.maximum(peer, 0)]
            vxlan_codec.encode_batch(batch.buf, batch.lengths[:n], batch.offset, self.template, macs)
        sock_index = flow_hash(batch.buf[send], batch.offset, len(send)) % np.uint32(len(self.udp.pool))
        head = self.headroom
        start = batch.offset - head
        lengths = batch.lengths
        views = [batch.buf[i, start : batch.offset + lengths[i]].data for i in send.tolist()]
        dsts = [self._peer_dsts[p] for p in peer_s.tolist()]
        failed = self.udp.send(sock_index, views, dsts)
        sent = len(send) - failed
        self._count("tx_packets", sent)
        self._count("tx_bytes", int(lengths[send].sum()))
        self._count("tx_batches")
        if failed:
            self._count("drop_send_error", failed)

    def _answer_tx_drops(self, batch: PacketBatch, reason: np.ndarray) -> None:
        counts = np.bincount(reason, minlength=len(_TX_REASONS))
        for code, name in enumerate(_TX_REASONS):
            if code and counts[code]:
                self._count(name, int(counts[code]))
        src4, src6 = self.cfg.icmp_src_v4, self.cfg.icmp_src_v6
        for i in np.flatnonzero((reason != TX_OK) & (reason != TX_BAD_HEADER)).tolist():
            pkt = bytes(batch.packet(i))
            code = reason[i]
            if code == TX_TOO_BIG:
                reply = (
                    icmp.packet_too_big(pkt, self.cfg.mtu, src4, src6) if icmp.is_dont_fragment(pkt) else None
                )
            elif code == TX_UNKNOWN_PEER:
                reply = icmp.net_unreachable(pkt, src4, src6)
            else:
                reply = icmp.time_exceeded(pkt, src4, src6)
            if reply is not None and self.tun.write(reply):
                self._count("icmp_sent")

    # --- RX -----------------------------------------------------------------------------------------------

    def rx_once(self) -> int:
        """Receive one batch of datagrams and deliver it; returns datagrams received."""
        batch = self.rx_batch
        sources = self.udp.recv_batch(batch, BATCH)
        n = batch.n
        if n == 0:
            return 0
        try:
            self.process_rx(batch, sources)
        except Exception:  # a bug must not stop the datapath: drop the batch, count it
            self._internal_error(n)
        return n

    def process_rx(self, batch: PacketBatch, sources: list[str]) -> None:
        n = batch.n
        names = np.zeros(n, dtype=np.uint8)  # index into _RX_REASONS
        if self.is_vxlan:
            codes = vxlan_codec.decode_batch(
                batch.buf, batch.lengths[:n], batch.offset, self.cfg.vni, self.mac
            )
            for code, name in _VXLAN_CODES.items():
                names[codes == code] = _RX_REASONS.index(name)
        else:
            codes = udp_codec.decode_batch(batch.buf, batch.lengths[:n], batch.offset)
            names[codes != udp_codec.OK] = _RX_REASONS.index("drop_bad_header")
        if self.cfg.check_peer_source:
            known = self.table.sources
            stranger = np.fromiter((s not in known for s in sources), dtype=bool, count=n)
            names[stranger & (names == 0)] = _RX_REASONS.index("drop_not_a_peer_source")
        counts = np.bincount(names, minlength=len(_RX_REASONS))
        for code, name in enumerate(_RX_REASONS):
            if code and counts[code]:
                self._count(name, int(counts[code]))
        head = self.headroom
        delivered = 0
        nbytes = 0
        for i in np.flatnonzero(names == 0).tolist():
            ln = int(batch.lengths[i]) - head
            start = batch.offset + head
            if self.tun.write(batch.buf[i, start : start + ln].data):
                delivered += 1
                nbytes += ln
            else:
                self._count("drop_tun_write_error")
        self._count("rx_packets", delivered)
        self._count("rx_bytes", nbytes)
        self._count("rx_batches")


TX_OK, TX_BAD_HEADER, TX_UNKNOWN_PEER, TX_TOO_BIG, TX_TTL_EXCEEDED = range(5)
_TX_REASONS = ("", "drop_bad_header", "drop_unknown_peer", "drop_too_big", "drop_ttl_exceeded")
_RX_REASONS = (
    "",
    "drop_bad_header",
    "drop_bad_vni",
    "drop_wrong_dst_mac",
    "drop_bad_ethertype",
    "drop_not_a_peer_source",
)
