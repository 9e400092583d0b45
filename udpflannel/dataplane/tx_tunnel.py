"""The engine's TX path through the tunnel TAP (io/tunnel_tap.py): a TCP superpacket to a peer over the IPv4
underlay goes out as one write, codec/vxlan_tunnel.py's 88 bytes of headers and the packet as the TUN gave
it, and the kernel cuts it into VXLAN frames. Python's work per superpacket is a flow lookup, seven header
fields and a writev, instead of the split (packet/gso.py) and a UDP_SEGMENT send. Anything else (UDP
superpackets, a peer over IPv6, segments over the MTU, no peer) answers False and takes the split path.

TunnelTx is a mixin of dataplane.engine.Engine and uses its attributes: cfg, mac, table, _flow, _count,
counters."""

from __future__ import annotations

import errno
import os

from udpflannel.codec import vxlan_tunnel as vt
from udpflannel.dataplane.counters import DROP_NAMES, INDEX
from udpflannel.dataplane.peers import NO_PEER
from udpflannel.packet.batch import PacketBatch
from udpflannel.packet.drops import DropReason
from udpflannel.packet.vnet import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
)

_SEND_ERROR = INDEX[DROP_NAMES[DropReason.SEND_ERROR]]
_TCP = (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6)
_TCP_DOFF = 12  # the TCP data offset byte


class TunnelTx:
    _tap_fd = -1  # set by use_tunnel; -1: every superpacket takes the split path

    def use_tunnel(self, fd: int, tap_mac: bytes, src_ip: str, ports: list[int]) -> None:
        """Send TCP superpackets through the TAP `fd` (whose MAC is tap_mac), as from src_ip and the
        outer source ports of our socket pool (a flow keeps the port the split path would give it)."""
        self._tap_fd = fd
        self._tap_mac = tap_mac
        self._tunnel_src = src_ip
        self._tunnel_ports = ports
        self._ip_id = 0
        self._tunnel_peers()

    def _tunnel_peers(self) -> None:
        """Per peer of the current table, its TunnelHeaders (None: not over the IPv4 underlay)."""
        if self._tap_fd < 0:
            return
        table = self.table  # type: ignore[attr-defined]
        self._tunnel = [
            None
            if table.outer_v6[i]
            else vt.TunnelHeaders.for_peer(
                tap_mac=self._tap_mac,
                src_ip=self._tunnel_src,
                dst_ip=ip,
                dst_port=self.cfg.port,  # type: ignore[attr-defined]
                vni=self.cfg.vni,  # type: ignore[attr-defined]
                our_mac=self.mac,  # type: ignore[attr-defined]
                peer_mac=table.macs[i].tobytes(),
            )
            for i, ip in enumerate(table.public_ips)
        ]

    def send_tunnel(self, batch: PacketBatch, i: int, vnet: tuple[int, int, int, int, int, int]) -> bool:
        """Row i of `batch` (a superpacket read with virtio header `vnet`) through the TAP; False, having
        sent nothing, when it must take the split path."""
        flags, gso_type, _, gso_size, csum_start, _ = vnet
        tcp = gso_type & ~VIRTIO_NET_HDR_GSO_ECN in _TCP
        if not tcp or not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM or gso_size == 0:
            return False
        off = batch.offset
        ln = int(batch.lengths[i])
        if ln > vt.MAX_INNER or csum_start + _TCP_DOFF >= ln:
            return False
        peer, sock_index = self._flow(batch.buf, off, i)  # type: ignore[attr-defined]
        headers = self._tunnel[peer] if peer != NO_PEER else None
        if headers is None:
            return False
        hl = csum_start + (int(batch.buf[i, off + csum_start + _TCP_DOFF]) >> 4) * 4
        if hl + gso_size > self.cfg.mtu or hl >= ln:  # type: ignore[attr-defined]
            return False  # the split path answers what is over the MTU as a router would
        k = -(-(ln - hl) // gso_size)
        prefix = headers.build(
            ln, vnet, self._tunnel_ports[sock_index % len(self._tunnel_ports)], self._ip_id
        )
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
