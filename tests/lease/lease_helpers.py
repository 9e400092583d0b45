"""Helpers shared by the lease tests (a fake clock, test node attributes, store capability names)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from udpflannel.config import NetworkConfig, parse_net_conf
from udpflannel.lease.model import LeaseAttrs
from udpflannel.subnet import SubnetEnv

# Capabilities a backend may lack; contract tests that need one skip with a reason when it is missing.
CAP_RESERVE = "reserve"  # Store.reserve() works (the Kubernetes store has no reservations)
CAP_COMPACT = "compact"  # StoreBackend.compact can make old revisions unavailable
ALL_CAPS = frozenset({CAP_RESERVE, CAP_COMPACT})


@dataclass
class FakeClock:
    """Unix time that moves only when a test says so."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def node_attrs(n: int, backend_type: str = "vxlan") -> LeaseAttrs:
    """Attributes of test node n: PublicIP 198.18.0.n (underlay range, DESIGN.md safety rules)."""
    return LeaseAttrs(
        public_ip=ipaddress.IPv4Address(f"198.18.0.{n}"),
        backend_type=backend_type,
        backend_data={"VNI": 1, "VtepMAC": f"02:00:00:00:00:{n:02x}"},
    )


def net_conf(
    network: str | None = "198.19.0.0/16",
    subnet_len: int = 24,
    subnet_min: str | None = None,
    subnet_max: str | None = None,
    ipv6_network: str | None = None,
    ipv6_subnet_len: int = 64,
) -> NetworkConfig:
    """A validated NetworkConfig from config.parse_net_conf; SubnetMin/Max given as networks."""
    doc: dict[str, object] = {"EnableIPv4": network is not None, "EnableIPv6": ipv6_network is not None}
    if network is not None:
        doc.update(Network=network, SubnetLen=subnet_len)
    if subnet_min is not None:
        doc["SubnetMin"] = subnet_min.split("/")[0]
    if subnet_max is not None:
        doc["SubnetMax"] = subnet_max.split("/")[0]
    if ipv6_network is not None:
        doc.update(IPv6Network=ipv6_network, IPv6SubnetLen=ipv6_subnet_len)
    return parse_net_conf(json.dumps(doc))


def subnet_env(subnet: str, ipv6_subnet: str | None = None) -> SubnetEnv:
    """A previous subnet.env as subnet.read_subnet_env returns it."""
    return SubnetEnv(
        network=ipaddress.IPv4Network("198.19.0.0/16"),
        subnet=ipaddress.IPv4Interface(subnet),
        ipv6_subnet=ipaddress.IPv6Interface(ipv6_subnet) if ipv6_subnet else None,
        mtu=1450,
        ipmasq=True,
    )
