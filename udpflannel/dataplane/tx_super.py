"""The engine's TX path for superpackets (TUN reads with GSO): split them (packet/gso.py, or together
with packet/gso_many.py when a read holds several), write the encapsulation in front of every segment and
send them as UDP_SEGMENT messages: one sendmmsg for a whole read when its superpackets are one flow's.
Anything unusual (no peer, over the MTU, a TTL about to expire) takes the engine's general path.

SuperpacketTx is a mixin of dataplane.engine.Engine and uses its attributes: cfg, head, is_vxlan, table,
_pools, _dsts, _headers, counters, _count, _count_drops, _flow (rowpath), send_batch, and _tap_fd and
send_tunnel (dataplane/tx_tunnel.py)."""

from __future__ import annotations

import numpy as np

from udpflannel.codec import udp as udp_codec
from udpflannel.codec import vxlan as vxlan_codec
from udpflannel.dataplane.counters import DROP_NAMES, INDEX
from udpflannel.dataplane.peers import NO_PEER
from udpflannel.dataplane.spec import HEADROOM
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.drops import DropReason
from udpflannel.packet.gso import packed_payload, split_superpacket
from udpflannel.packet.gso_many import SPLIT_MANY_MIN, ManySplit, split_many
from udpflannel.packet.vnet import VnetHdr

PACKED_MIN_SEGMENT = 256  # superpackets with at least this gso_size are split end to end (one send buffer)
_SEND_ERROR = INDEX[DROP_NAMES[DropReason.SEND_ERROR]]


class SuperpacketTx:
    def _send_superpackets(
        self, batch: PacketBatch, headers: np.ndarray, hd: list, gso_list: list[int], ttl_done: dict
    ) -> None:
        """Split and send the superpackets in rows `gso_list` (hd: their virtio headers as tuples), or hand
        them to the tunnel TAP (dataplane/tx_tunnel.py), row by row in the order read."""
        if self._tap_fd >= 0:
            for i in gso_list:
                ttl = ttl_done.get(i, False)
                if not self.send_tunnel(batch, i, hd[i], ttl):
                    self._split_one(batch, i, hd[i], ttl)
            return
        if len(gso_list) >= SPLIT_MANY_MIN and min(hd[i][3] for i in gso_list) >= PACKED_MIN_SEGMENT:
            # Several superpackets (the sender is behind): split together when they share a shape.
            many = split_many(batch, headers, np.array(gso_list), self.head)
            if many is not None:
                self._count("tx_superpackets", len(many))
                done = [ttl_done.get(i, False) for i in gso_list]
                if not self._send_together(many, done):
                    for segs, ttl in zip(many.parts(), done, strict=True):
                        self.send_superpacket(segs, ttl_done=ttl)
                return
        for i in gso_list:
            self._split_one(batch, i, hd[i], ttl_done.get(i, False))

    def _split_one(self, batch: PacketBatch, i: int, vnet: tuple, ttl_done: bool) -> None:
        """Split the superpacket in row i (virtio header `vnet`) and send its segments."""
        ln = int(batch.lengths[i])
        vh = VnetHdr(*vnet)
        # Packed rows (end to end) go out as one buffer; tiny segments keep the padded layout, whose
        # rows are wide enough for every header column the general path reads.
        packed = vh.gso_size >= PACKED_MIN_SEGMENT
        segs = split_superpacket(
            batch.buf[i, batch.offset : batch.offset + ln],
            vh,
            self.head if packed else HEADROOM,
            packed=packed,
        )
        if segs.drop:
            self._count_drops(np.array([segs.drop], dtype=np.uint8))
            return
        self._count("tx_superpackets")
        self.send_superpacket(segs, ttl_done=ttl_done)

    def _send_together(self, many: ManySplit, ttl_done: list[bool]) -> bool:
        """The superpackets of one read, split together, as one sendmmsg when they are one flow's (one
        peer, one outer 5-tuple) and nothing needs the general path; False, having done nothing, if not."""
        whole = many.whole
        buf, off, n = whole.buf, whole.offset, whole.n
        flows = {self._flow(buf, off, r) for r in many.starts[:-1]}
        if len(flows) != 1 or (not self.is_vxlan and not all(ttl_done)):
            return False  # (udp: a TTL that did not go down in the superpacket is judged per segment)
        ((peer, sock_index),) = flows
        if peer == NO_PEER or whole.stride - off > self.cfg.mtu:
            return False
        if self.is_vxlan:  # (udp: the TTLs went down in the superpackets already)
            self._encapsulate(buf, whole.lengths, off, peer)
        pool = self._pools[int(self.table.outer_v6[peer])]
        sock = pool[sock_index % len(pool)]
        calls = sock.stats.send_calls
        flat = buf.reshape(-1)
        sent = sock.send_spans(flat, many.spans(), whole.stride, self._dsts[peer])
        self._count("tx_send_calls", sock.stats.send_calls - calls)
        self._count("tx_packets", sent)
        self._count("tx_bytes", int(whole.lengths.sum()))
        if sent < n:
            self.counters[_SEND_ERROR] += n - sent
        return True

    def send_superpacket(self, segs: PacketBatch, *, ttl_done: bool = False) -> None:
        """Segments of one split superpacket: one flow, so one peer lookup, one header template, one outer
        5-tuple, and as few UDP_SEGMENT sends as the limits allow. Anything unusual takes the general path.
        ttl_done: udp, the TTL went down in the superpacket before the split."""
        n = segs.n
        lens = segs.lengths[:n]
        off = segs.offset
        peer, sock_index = self._flow(segs.buf, off, 0)
        ttl_at = off + (7 if segs.buf[0, off] >> 4 == 6 else 8)  # IPv6 hop limit / IPv4 TTL
        longest, final = int(lens[0]), int(lens[n - 1])  # a split: every segment but the last is longest
        if (
            peer == NO_PEER
            or longest > self.cfg.mtu
            or (not self.is_vxlan and not ttl_done and int(segs.buf[:n, ttl_at].min()) <= 1)
        ):
            self.send_batch(segs, np.ones(n, dtype=bool), one_flow=True, ttl_done=ttl_done)
            return
        if self.is_vxlan or not ttl_done:
            self._encapsulate(segs.buf, lens, off, peer)
        pool = self._pools[int(self.table.outer_v6[peer])]
        sock = pool[sock_index % len(pool)]
        calls, before = sock.stats.send_calls, sock.stats.sent
        dest = self._dsts[peer]
        if off == self.head:  # packed: datagrams end to end, one buffer
            sock.send_packed(packed_payload(segs), segs.stride, dest)
        else:
            sock.send_segments(segs.views(head=self.head), None, dest)
        sent = sock.stats.sent - before  # datagrams the kernel took
        self._count("tx_send_calls", sock.stats.send_calls - calls)
        self._count("tx_packets", sent)
        self._count("tx_bytes", longest * (n - 1) + final)
        if sent < n:
            self.counters[_SEND_ERROR] += n - sent

    def _encapsulate(self, buf: np.ndarray, lens: np.ndarray, off: int, peer: int) -> None:
        """One flow's segments (row i: a packet of lens[i] bytes from column `off`) made ready for the
        wire: vxlan, the peer's header row broadcast into every row's headroom; udp (flannel's udp proxy),
        the TTL down by one (the caller has made sure none expires)."""
        n = len(lens)
        if self.is_vxlan:
            buf[:n, off - self.head : off] = self._headers[peer]
            if buf[0, off] >> 4 == 6:
                buf[:n, off - 2] = vxlan_codec.ETHERTYPE_IPV6 >> 8
                buf[:n, off - 1] = vxlan_codec.ETHERTYPE_IPV6 & 0xFF
        else:
            udp_codec.decrement_ttl_batch(buf, lens, off, np.ones(n, dtype=bool))
