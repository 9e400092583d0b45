"""Routes to peers kept in the kernel: which subnets may be routed at all, and reading the kernel's routes
back from /proc for the periodic check."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from udpflannel.host.peer_routes import DIRECT_TTL, PeerRoutes, kernel_gateways, safe_peer_subnet

NETS = [ipaddress.IPv4Network("198.19.0.0/16"), ipaddress.IPv6Network("fd00:198:100::/56")]
OURS = [ipaddress.IPv4Network("198.19.1.0/24"), ipaddress.IPv6Network("fd00:198:100:1::/64")]


@pytest.mark.parametrize(
    ("subnet", "ok"),
    [
        ("198.19.2.0/24", True),
        ("fd00:198:100:2::/64", True),
        ("0.0.0.0/0", False),
        ("::/0", False),
        ("198.18.0.0/24", False),  # the underlay
        ("198.19.1.128/25", False),  # inside ours
        ("198.19.0.0/16", False),  # the whole network: over ours
        ("fd00:198:100:1::/64", False),
    ],
)
def test_only_subnets_inside_the_network_and_clear_of_ours_are_routed(subnet: str, ok: bool) -> None:
    assert safe_peer_subnet(ipaddress.ip_network(subnet), NETS, OURS) is ok


def test_kernel_routes_are_read_back_from_proc(tmp_path: Path) -> None:
    route = tmp_path / "route"
    route.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t000213C6\t020012C6\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # 198.19.2.0/24 via 198.18.0.2
        "eth0\t000012C6\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"  # connected: no gateway
        "cni0\t000313C6\t030012C6\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # another device
    )
    route6 = tmp_path / "ipv6_route"
    route6.write_text(
        "fd000198000200000000000000000000 40 00000000000000000000000000000000 00 "
        "fd000198000000000000000000000002 00000400 00000001 00000000 00000003     eth0\n"
        "fd000198000000000000000000000000 30 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    )
    assert kernel_gateways("eth0", str(route), str(route6)) == {
        "198.19.2.0/24": "198.18.0.2",
        "fd00:198:2::/64": "fd00:198::2",
    }
    assert kernel_gateways("eth0", str(tmp_path / "none"), str(tmp_path / "none")) == {}


def test_is_direct_asks_the_kernel_once_a_minute_per_address(monkeypatch: pytest.MonkeyPatch) -> None:
    routes = PeerRoutes("eth0")
    asked: list[str] = []
    answers = {
        "198.18.0.2": {"dev": "eth0", "gateway": None},
        "198.18.250.9": {"dev": "eth0", "gateway": "198.18.0.2"},
    }

    def route_to(ip: str) -> dict:
        asked.append(ip)
        return answers.get(ip, {})

    monkeypatch.setattr(routes.host, "route_to", route_to)
    assert routes.is_direct("198.18.0.2") and routes.is_direct("198.18.0.2")
    assert not routes.is_direct("198.18.250.9")  # behind a router
    assert not routes.is_direct("198.18.0.7")  # no route at all
    assert asked == ["198.18.0.2", "198.18.250.9", "198.18.0.7"]
    clock = time.monotonic() + DIRECT_TTL + 1
    monkeypatch.setattr(time, "monotonic", lambda: clock)
    routes.is_direct("198.18.0.2")
    assert asked[-1] == "198.18.0.2" and len(asked) == 4
