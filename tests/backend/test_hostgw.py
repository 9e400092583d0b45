"""The host-gw backend's decisions, without a host: which peer leases become which routes, what it publishes,
when it refuses to start, and how it reads the kernel's routes back from /proc."""

from __future__ import annotations

import ipaddress
import re
from types import SimpleNamespace

import pytest

from udpflannel.backend import BackendUnavailable, ExternalInterface, create_backend
from udpflannel.backend.hostgw import HostGwBackend, peer_routes
from udpflannel.config import parse_net_conf
from udpflannel.host.links import Route
from udpflannel.lease.model import Lease, LeaseAttrs

IFACE = ExternalInterface("eth0", 2, 1500, "198.18.0.1", "fd00:198::1", "198.18.0.1", "fd00:198::1")


def lease(
    subnet: str, public_ip: str, backend: str = "host-gw", v6: str | None = None, ip6: str | None = None
):
    return Lease(
        ipaddress.IPv4Network(subnet),
        LeaseAttrs(
            public_ip=ipaddress.IPv4Address(public_ip),
            public_ipv6=ipaddress.IPv6Address(ip6) if ip6 else None,
            backend_type=backend,
        ),
        ipv6_subnet=ipaddress.IPv6Network(v6) if v6 else None,
    )


NET4, NET6 = ipaddress.IPv4Network("198.19.0.0/16"), ipaddress.IPv6Network("fd00:198:100::/56")
OURS = [ipaddress.IPv4Network("198.19.1.0/24")]


def test_a_peer_lease_is_a_route_per_family_via_its_public_address() -> None:
    peer = lease("198.19.2.0/24", "198.18.0.2", v6="fd00:198:100:2::/64", ip6="fd00:198::2")
    assert peer_routes(peer, "eth0", [NET4], OURS) == [Route("198.19.2.0/24", "eth0", "198.18.0.2")]
    assert peer_routes(peer, "eth0", [NET4, NET6], OURS) == [
        Route("198.19.2.0/24", "eth0", "198.18.0.2"),
        Route("fd00:198:100:2::/64", "eth0", "fd00:198::2"),
    ]


@pytest.mark.parametrize("backend", ["vxlan", "", "wireguard"])
def test_peers_of_other_backends_get_no_route(backend: str) -> None:
    assert peer_routes(lease("198.19.2.0/24", "198.18.0.2", backend), "eth0", [NET4, NET6], OURS) == []


def test_an_ipv6_subnet_without_a_public_ipv6_gets_no_route() -> None:
    peer = lease("198.19.2.0/24", "198.18.0.2", v6="fd00:198:100:2::/64")
    assert [r.dst for r in peer_routes(peer, "eth0", [NET4, NET6], OURS)] == ["198.19.2.0/24"]


@pytest.mark.parametrize(
    "subnet",
    [
        "0.0.0.0/0",  # would replace the node's default route
        "198.18.0.0/16",  # the underlay itself
        "198.19.0.0/16",  # the whole cluster network, ours included
        "198.19.1.0/25",  # inside our own subnet
    ],
)
def test_a_peer_subnet_outside_the_network_or_over_ours_is_never_routed(subnet: str) -> None:
    assert peer_routes(lease(subnet, "198.18.0.2"), "eth0", [NET4], OURS) == []


def _config(v6: bool = False):
    text = '{"Network": "198.19.0.0/16", "Backend": {"Type": "host-gw"}}'
    if v6:
        text = '{"Network": "198.19.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:198::/48",'
        text += ' "Backend": {"Type": "host-gw"}}'
    return parse_net_conf(text)


def test_it_publishes_host_gw_without_backend_data_and_keeps_the_interface_mtu() -> None:
    backend = create_backend(_config(), SimpleNamespace(), IFACE)
    assert isinstance(backend, HostGwBackend)
    assert backend.mtu == 1500 and backend.overhead == 0
    assert backend.lease_attrs().to_json() == {"PublicIP": "198.18.0.1", "BackendType": "host-gw"}
    dual = create_backend(_config(v6=True), SimpleNamespace(), IFACE).lease_attrs().to_json()
    assert dual == {"PublicIP": "198.18.0.1", "PublicIPv6": "fd00:198::1", "BackendType": "host-gw"}


@pytest.mark.parametrize(
    ("public_ip", "public_ipv6", "v6", "said"),
    [
        ("198.18.0.9", "fd00:198::1", False, "public IP 198.18.0.9 is not the address of eth0 (198.18.0.1)"),
        (
            "198.18.0.1",
            "fd00:198::9",
            True,
            "public IPv6 fd00:198::9 is not the address of eth0 (fd00:198::1)",
        ),
    ],
)
def test_a_public_address_behind_nat_is_refused(
    public_ip: str, public_ipv6: str, v6: bool, said: str
) -> None:
    iface = ExternalInterface("eth0", 2, 1500, "198.18.0.1", "fd00:198::1", public_ip, public_ipv6)
    with pytest.raises(BackendUnavailable, match=re.escape(said)):
        create_backend(_config(v6), SimpleNamespace(), iface)


def test_an_ipv6_public_address_is_not_checked_when_ipv6_is_off() -> None:
    iface = ExternalInterface("eth0", 2, 1500, "198.18.0.1", "fd00:198::1", "198.18.0.1", "fd00:198::9")
    create_backend(_config(), SimpleNamespace(), iface)


def test_a_lease_with_one_of_our_addresses_is_not_routed() -> None:
    """A stale lease of this very node (another subnet, our public IP): a route via ourselves would loop."""
    ours = frozenset({"198.18.0.1"})
    assert peer_routes(lease("198.19.2.0/24", "198.18.0.1"), "eth0", [NET4], OURS, ours) == []
    assert peer_routes(lease("198.19.2.0/24", "198.18.0.2"), "eth0", [NET4], OURS, ours) != []
