"""The engine's TX path through the tunnel TAP (io/tunnel_tap.py): a TCP superpacket (or a UDP one, from a pod
that sends with UDP GSO) to a peer goes out as one write, codec/tunnel_gso.py's headers (88 bytes for vxlan,
108 over the IPv6 underlay, 66 for flannel's udp format) and the packet as the TUN gave it, and the kernel
cuts it into wire-size frames. Python's work per superpacket is a flow lookup, a few header fields and a
writev, instead of the split (packet/gso.py) and a UDP_SEGMENT send. Anything else (a peer over IPv6 when
the TAP does not forward IPv6, segments over the MTU, no peer, a TTL the udp format cannot take one from)
answers False and takes the split path.

TunnelTx is a mixin of dataplane.engine.Engine and uses its attributes: cfg, is_vxlan, mac, table, _flow,
_count, counters."""

from __future__ import annotations

import errno
import os

from udpflannel.codec import tunnel_gso
from udpflannel.dataplane.counters import DROP_NAMES, INDEX
from udpflannel.dataplane.peers import NO_PEER
from udpflannel.packet import headers as h
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.drops import DropReason
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)

_SEND_ERROR = INDEX[DROP_NAMES[DropReason.SEND_ERROR]]
_TCP = (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6)
_KINDS = (*_TCP, VIRTIO_NET_HDR_GSO_UDP_L4)  # what the kernel segments inside a UDP tunnel


class TunnelTx:
    _tap_fd = -1  # set by use_tunnel; -1: every superpacket takes the split path

    def use_tunnel(
        self,
        fd: int,
        tap_mac: bytes,
        src_ip: str,
        ports: list[int],
        *,
        src_ip6: str | None = None,
        ports6: list[int] | None = None,
    ) -> None:
        """Send TCP superpackets through the TAP `fd` (whose MAC is tap_mac), as from src_ip and the
        outer source ports of our socket pool (a flow keeps the port the split path would give it); to
        peers over IPv6 as well when src_ip6 (and the IPv6 pool's ports6) are given."""
        self._tap_fd = fd
        self._tap_mac = tap_mac
        self._tunnel_src = src_ip
        self._tunnel_src6 = src_ip6
        self._tunnel_ports = ports
        self._tunnel_ports6 = ports6 or ports
        self._ip_id = 0
        self._tunnel_peers()

    def _tunnel_peers(self) -> None:
        """Per peer of the current table, its TunnelHeaders (None: not over the IPv4 underlay)."""
        if self._tap_fd < 0:
            return
        table, cfg = self.table, self.cfg  # type: ignore[attr-defined]
        self._tunnel: list[tunnel_gso.TunnelHeaders | None] = []
        for i, ip in enumerate(table.public_ips):
            src = self._tunnel_src6 if table.outer_v6[i] else self._tunnel_src
            if src is None:
                self._tunnel.append(None)
                continue
            encap = (
                tunnel_gso.vxlan_encap(cfg.vni, self.mac, table.macs[i].tobytes())  # type: ignore[attr-defined]
                if self.is_vxlan  # type: ignore[attr-defined]
                else b""  # flannel's udp format: the inner packet right after the UDP header
            )
            self._tunnel.append(
                tunnel_gso.TunnelHeaders.for_peer(
                    tap_mac=self._tap_mac, src_ip=src, dst_ip=ip, dst_port=cfg.port, encap=encap
                )
            )

    def send_tunnel(
        self, batch: PacketBatch, i: int, vnet: tuple[int, int, int, int, int, int], ttl_done: bool = False
    ) -> bool:
        """Row i of `batch` (a superpacket read with virtio header `vnet`) through the TAP; False, having
        sent nothing, when it must take the split path. ttl_done: udp format, the superpacket's TTL went
        down already (flannel's udp proxy routes like a router; a TTL that would expire is answered on the
        split path)."""
        flags, gso_type, _, gso_size, csum_start, _ = vnet
        kind = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
        if kind not in _KINDS or not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM or gso_size == 0:
            return False
        tcp = kind in _TCP
        if not (ttl_done or self.is_vxlan):  # type: ignore[attr-defined]
            return False
        off = batch.offset
        ln = int(batch.lengths[i])
        if csum_start + h.TCP_DOFF >= ln:
            return False
        peer, sock_index = self._flow(batch.buf, off, i)  # type: ignore[attr-defined]
        headers = self._tunnel[peer] if peer != NO_PEER else None
        if headers is None or ln > headers.max_inner:
            return False
        hl = csum_start + ((int(batch.buf[i, off + csum_start + h.TCP_DOFF]) >> 4) * 4 if tcp else h.UDP_HLEN)
        if hl + gso_size > self.cfg.mtu or hl >= ln:  # type: ignore[attr-defined]
            return False  # the split path answers what is over the MTU as a router would
        k = -(-(ln - hl) // gso_size)
        ports = self._tunnel_ports6 if headers.outer_v6 else self._tunnel_ports
        inner_v6 = int(batch.buf[i, off]) >> 4 == 6
        prefix = headers.build(ln, vnet, ports[sock_index % len(ports)], self._ip_id, inner_v6)
        try:
            os.writev(self._tap_fd, (prefix, batch.buf[i, off : off + ln]))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return False  # a header the kernel would not take: the split path judges the packet
            self.counters[_SEND_ERROR] += k  # type: ignore[attr-defined]
            return True
        self._ip_id = (self._ip_id + k) & 0xFFFF
        count = self._count  # type: ignore[attr-defined]
        count("tx_superpackets")
        count("tx_tunnel_writes")
        count("tx_send_calls")
        count("tx_packets", k)
        count("tx_bytes", (k - 1) * hl + ln)
        return True
