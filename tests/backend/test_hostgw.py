"""The host-gw backend's decisions, without a host: what it publishes and when it refuses to start (which
peer leases become which routes: tests/host/test_peer_routes.py)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from udpflannel.backend import BackendUnavailable, ExternalInterface, create_backend
from udpflannel.backend.hostgw import HostGwBackend
from udpflannel.config import parse_net_conf

IFACE = ExternalInterface("eth0", 2, 1500, "198.18.0.1", "fd00:198::1", "198.18.0.1", "fd00:198::1")


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
