"""The vxlan backend: flannel's VXLAN on the wire (VNI 1, port 8472, inner Ethernet to the peer's VtepMAC),
carried by the userspace datapath through a TUN named flannel.<VNI>, so it talks to kernel flannel.1 peers.

It decides: VtepMAC (random, locally administered, kept in a file beside --subnet-file), BackendData, MTU,
which peer leases are usable. host/ applies the TUN setup; dataplane/ moves the packets.
"""

from __future__ import annotations

import logging
import os
import pathlib
import secrets
from typing import Any

from udpflannel.codec.wire import (
    VXLAN_DEFAULT_VNI,
    VXLAN_OVERHEAD,
    VXLAN_OVERHEAD_V6,
    VXLAN_PORT,
    format_mac,
    parse_mac,
)
from udpflannel.dataplane.spec import EngineConfig, Peer
from udpflannel.dataplane.tunnel import TunnelBackend, peer_public_ip
from udpflannel.host.links import HostConfig
from udpflannel.lease.model import Lease, LeaseAttrs

log = logging.getLogger(__name__)

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
MAC_FILE_PREFIX = "udpflannel-vtep-mac."


def random_vtep_mac() -> str:
    """A random unicast, locally administered MAC (first octet: bit 1 set, bit 0 clear), as Linux makes."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return format_mac(bytes(raw))


def load_or_create_mac(path: pathlib.Path) -> str:
    """Our VtepMAC, kept across restarts so peers' fdb entries stay valid; a bad file is replaced."""
    try:
        text = path.read_text().strip()
        parse_mac(text)
        return text.lower()
    except (OSError, ValueError):
        pass
    mac = random_vtep_mac()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(mac + "\n")
    os.replace(tmp, path)
    return mac


class VxlanBackend(TunnelBackend):
    type = "vxlan"
    overhead = VXLAN_OVERHEAD
    overhead_v6 = VXLAN_OVERHEAD_V6
    supports_v6_underlay = True

    def __init__(self, config: Any, options: Any, iface: Any) -> None:
        super().__init__(config, options, iface)
        self.vni = int(getattr(config.backend, "vni", VXLAN_DEFAULT_VNI) or VXLAN_DEFAULT_VNI)
        self.port = int(config.backend.port or VXLAN_PORT)
        self.tun_name = f"flannel.{self.vni}"
        subnet_file = pathlib.Path(getattr(options, "subnet_file", None) or DEFAULT_SUBNET_FILE)
        self.mac_file = subnet_file.parent / f"{MAC_FILE_PREFIX}{self.tun_name}"
        self.vtep_mac = load_or_create_mac(self.mac_file)

    def backend_data(self) -> dict[str, Any]:
        return {"VNI": self.vni, "VtepMAC": self.vtep_mac}

    def lease_attrs(self) -> LeaseAttrs:
        import ipaddress

        v6 = getattr(self.config, "enable_ipv6", False)
        return LeaseAttrs(
            public_ip=ipaddress.IPv4Address(self.iface.public_ip) if self.iface.public_ip else None,
            public_ipv6=ipaddress.IPv6Address(self.iface.public_ipv6)
            if v6 and self.iface.public_ipv6
            else None,
            backend_type=self.type,
            backend_data=self.backend_data() if getattr(self.config, "enable_ipv4", True) else None,
            backend_v6_data=self.backend_data() if v6 else None,
        )

    def engine_config(self, lease: Lease) -> EngineConfig:
        v4, v6 = self._tun_addresses(lease)
        return EngineConfig(
            encap="vxlan",
            mtu=self.mtu,
            port=self.port,
            vni=self.vni,
            vtep_mac=self.vtep_mac,
            icmp_src_v4=v4,
            icmp_src_v6=v6,
        )

    def peer_rows(self, lease: Lease) -> list[Peer]:
        attrs = lease.attrs
        if attrs.backend_type != self.type:
            log.warning("peer %s has backend %r, not vxlan: ignored", lease.key, attrs.backend_type)
            return []
        rows = []
        for subnet, data in ((lease.subnet, attrs.backend_data), (lease.ipv6_subnet, attrs.backend_v6_data)):
            if subnet is None:
                continue
            data = data if isinstance(data, dict) else attrs.backend_data
            try:
                mac = format_mac(parse_mac(str(data["VtepMAC"])))
                vni = int(data.get("VNI", self.vni))
            except (TypeError, KeyError, ValueError, AttributeError, OverflowError):  # int(inf)
                log.warning("peer %s: BackendData %r has no usable VtepMAC or VNI: ignored", lease.key, data)
                continue
            if vni != self.vni:
                log.warning("peer %s uses VNI %d, we use %d: ignored", lease.key, vni, self.vni)
                continue
            public_ip = peer_public_ip(lease, subnet.version, self.v6_underlay)
            if public_ip is None:
                continue
            rows.append(Peer(str(subnet), public_ip, mac))
        return rows

    def configure_tun(self, host: HostConfig, lease: Lease) -> None:
        self._route_cluster(host, lease)
