"""Helpers shared by the lease tests (a fake clock, test node attributes, store capability names)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from udpflannel.lease.model import LeaseAttrs

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


# Stand-ins with the fields of config.NetworkConfig and subnet.SubnetEnv, so these tests do not depend on
# the parsing code (tested in tests/test_config.py); the manager only reads these fields.
@dataclass(frozen=True)
class NetConf:
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    network: ipaddress.IPv4Network | None = None
    subnet_len: int = 0
    subnet_min: ipaddress.IPv4Network | None = None
    subnet_max: ipaddress.IPv4Network | None = None
    ipv6_network: ipaddress.IPv6Network | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: ipaddress.IPv6Network | None = None
    ipv6_subnet_max: ipaddress.IPv6Network | None = None
    enable_nftables: bool = False
    backend: object = None


@dataclass(frozen=True)
class SubnetEnvHint:
    network: ipaddress.IPv4Network | None = None
    subnet: ipaddress.IPv4Interface | None = None
    ipv6_network: ipaddress.IPv6Network | None = None
    ipv6_subnet: ipaddress.IPv6Interface | None = None
    mtu: int | None = None
    ipmasq: bool | None = None


def _range(network, subnet_len: int, smin: str | None, smax: str | None):
    """flannel's defaults: SubnetMin = the second subnet, SubnetMax = the last one."""
    size = 1 << (network.max_prefixlen - subnet_len)
    base = int(network.network_address)
    make = type(network)
    first = make(smin) if smin else make((base + size, subnet_len))
    last = make(smax) if smax else make((base + network.num_addresses - size, subnet_len))
    return first, last


def net_conf(
    network: str | None = "198.19.0.0/16",
    subnet_len: int = 24,
    subnet_min: str | None = None,
    subnet_max: str | None = None,
    ipv6_network: str | None = None,
    ipv6_subnet_len: int = 64,
    ipv6_subnet_min: str | None = None,
    ipv6_subnet_max: str | None = None,
) -> NetConf:
    v4 = ipaddress.IPv4Network(network) if network else None
    v6 = ipaddress.IPv6Network(ipv6_network) if ipv6_network else None
    smin, smax = _range(v4, subnet_len, subnet_min, subnet_max) if v4 else (None, None)
    smin6, smax6 = _range(v6, ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max) if v6 else (None, None)
    return NetConf(
        enable_ipv4=v4 is not None,
        enable_ipv6=v6 is not None,
        network=v4,
        subnet_len=subnet_len if v4 else 0,
        subnet_min=smin,
        subnet_max=smax,
        ipv6_network=v6,
        ipv6_subnet_len=ipv6_subnet_len if v6 else 0,
        ipv6_subnet_min=smin6,
        ipv6_subnet_max=smax6,
    )
