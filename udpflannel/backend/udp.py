"""The udp backend: flannel's udp on the wire (the bare inner IP packet in a UDP datagram to port 8285),
carried by the userspace datapath through a TUN named flannel0. Like flannel's proxy it decrements the TTL
and answers ICMP net-unreachable when no peer covers the destination. Publishes no BackendType, as flannel.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from udpflannel.codec.wire import UDP_OVERHEAD, UDP_PORT
from udpflannel.dataplane.spec import EngineConfig, Peer
from udpflannel.dataplane.tunnel import TunnelBackend, peer_public_ip
from udpflannel.host.links import HostConfig
from udpflannel.lease.model import Lease, LeaseAttrs

TUN_NAME = "flannel0"


class UdpBackend(TunnelBackend):
    type = "udp"
    overhead = UDP_OVERHEAD
    tun_name = TUN_NAME

    def __init__(self, config: Any, options: Any, iface: Any) -> None:
        super().__init__(config, options, iface)
        self.port = int(config.backend.port or UDP_PORT)

    def lease_attrs(self) -> LeaseAttrs:
        v6 = getattr(self.config, "enable_ipv6", False)
        return LeaseAttrs(
            public_ip=ipaddress.IPv4Address(self.iface.public_ip) if self.iface.public_ip else None,
            public_ipv6=ipaddress.IPv6Address(self.iface.public_ipv6)
            if v6 and self.iface.public_ipv6
            else None,
        )

    def engine_config(self, lease: Lease) -> EngineConfig:
        v4, v6 = self._tun_addresses(lease)
        return EngineConfig(encap="udp", mtu=self.mtu, port=self.port, icmp_src_v4=v4, icmp_src_v6=v6)

    def peer_rows(self, lease: Lease) -> list[Peer]:
        rows = []
        for subnet in lease.subnets:
            public_ip = peer_public_ip(lease, subnet.version)
            if public_ip is not None:
                rows.append(Peer(str(subnet), public_ip))
        return rows

    def configure_tun(self, host: HostConfig, lease: Lease) -> None:
        self._route_cluster(host, lease)
