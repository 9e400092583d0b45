"""Routes to peers kept in the kernel: which peer leases become which routes, which subnets may be routed at
all, reading the kernel's routes back from /proc for the periodic check, DirectRouting's cached answers."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from udpflannel.host.links import HostError, Route
from udpflannel.host.peer_routes import (
    CHECK_INTERVAL,
    DIRECT_TTL,
    PeerRoutes,
    kernel_gateways,
    peer_routes,
    safe_peer_subnet,
)
from udpflannel.lease.model import Lease, LeaseAttrs

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


def test_directness_is_judged_again_once_a_minute_with_fresh_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that moves behind a router (or back) with no lease event: the periodic judgement asks the
    kernel again instead of trusting the cached answer."""
    routes = PeerRoutes("eth0")
    answer = {"dev": "eth0", "gateway": None}
    monkeypatch.setattr(routes.host, "route_to", lambda ip: dict(answer))
    assert routes.is_direct("198.18.0.2")
    assert not routes.judgement_due()
    answer["gateway"] = "198.18.0.9"  # the underlay changed: the peer is now behind a router
    assert routes.is_direct("198.18.0.2")  # cached until the next judgement
    clock = time.monotonic() + DIRECT_TTL + 1
    monkeypatch.setattr(time, "monotonic", lambda: clock)
    assert routes.judgement_due()
    assert not routes.is_direct("198.18.0.2")
    assert not routes.judgement_due()  # the next one a minute later


def test_a_lookup_with_no_answer_is_asked_again_at_the_next_route_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No route to the peer yet (an underlay link coming up) or a failed lookup: tunnelled for now, but
    judged again CHECK_INTERVAL later, not a minute later, so its direct route follows within seconds."""
    routes = PeerRoutes("eth0")
    answers: dict[str, dict | Exception] = {"198.18.0.2": {}, "198.18.0.3": HostError("netlink helper died")}
    asked: list[str] = []

    def route_to(ip: str) -> dict:
        asked.append(ip)
        got = answers[ip]
        if isinstance(got, Exception):
            raise got
        return got

    monkeypatch.setattr(routes.host, "route_to", route_to)
    assert not routes.is_direct("198.18.0.2") and not routes.is_direct("198.18.0.3")
    assert not routes.judgement_due()
    answers["198.18.0.3"] = {"dev": "eth0", "gateway": None}  # its lookup works now
    start = time.monotonic()
    clock = [start + CHECK_INTERVAL + 1]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    assert routes.judgement_due() and not routes.judgement_due()  # once per due answer
    assert not routes.is_direct("198.18.0.2") and routes.is_direct("198.18.0.3")
    # Still no route to 198.18.0.2: asked again after twice the wait, not at every check.
    clock[0] = start + 2 * CHECK_INTERVAL + 2
    assert not routes.judgement_due()
    answers["198.18.0.2"] = {"dev": "eth0", "gateway": None}  # the link is up
    clock[0] = start + 3 * CHECK_INTERVAL + 2
    assert routes.judgement_due()
    assert routes.is_direct("198.18.0.2")
    assert not routes.judgement_due()  # settled: the next judgement is the minute's
    assert asked == ["198.18.0.2", "198.18.0.3", "198.18.0.2", "198.18.0.3", "198.18.0.2"]


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


NET4, NET6 = NETS


def test_a_peer_lease_is_a_route_per_family_via_its_public_address() -> None:
    peer = lease("198.19.2.0/24", "198.18.0.2", v6="fd00:198:100:2::/64", ip6="fd00:198::2")
    assert peer_routes(peer, "host-gw", "eth0", [NET4], OURS) == [
        Route("198.19.2.0/24", "eth0", "198.18.0.2")
    ]
    assert peer_routes(peer, "host-gw", "eth0", [NET4, NET6], OURS) == [
        Route("198.19.2.0/24", "eth0", "198.18.0.2"),
        Route("fd00:198:100:2::/64", "eth0", "fd00:198::2"),
    ]


@pytest.mark.parametrize("backend", ["vxlan", "", "wireguard"])
def test_peers_of_other_backends_get_no_route(backend: str) -> None:
    assert (
        peer_routes(lease("198.19.2.0/24", "198.18.0.2", backend), "host-gw", "eth0", [NET4, NET6], OURS)
        == []
    )


def test_an_ipv6_subnet_without_a_public_ipv6_gets_no_route() -> None:
    peer = lease("198.19.2.0/24", "198.18.0.2", v6="fd00:198:100:2::/64")
    assert [r.dst for r in peer_routes(peer, "host-gw", "eth0", [NET4, NET6], OURS)] == ["198.19.2.0/24"]


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
    assert peer_routes(lease(subnet, "198.18.0.2"), "host-gw", "eth0", [NET4], OURS) == []


def test_a_lease_with_one_of_our_addresses_is_not_routed() -> None:
    """A stale lease of this very node (another subnet, our public IP): a route via ourselves would loop."""
    ours = frozenset({"198.18.0.1"})
    assert peer_routes(lease("198.19.2.0/24", "198.18.0.1"), "host-gw", "eth0", [NET4], OURS, ours) == []
    assert peer_routes(lease("198.19.2.0/24", "198.18.0.2"), "host-gw", "eth0", [NET4], OURS, ours) != []
