"""backend/vxlan.py and backend/udp.py: what they publish, MTU, VtepMAC persistence, peer leases -> rows.
Decisions only (no root); tests/host and tests/interop cover applying them."""

from __future__ import annotations

import ipaddress
import json

import pytest

from udpflannel.backend import ExternalInterface, create_backend
from udpflannel.backend.udp import UdpBackend
from udpflannel.backend.vxlan import VxlanBackend, load_or_create_mac, random_vtep_mac
from udpflannel.codec.vxlan import parse_mac
from udpflannel.config import parse_net_conf
from udpflannel.lease.model import Lease, LeaseAttrs

IFACE = ExternalInterface("eth0", 2, 1500, "198.18.0.1", None, "198.18.0.1", None)


class Opts:
    def __init__(self, subnet_file: str) -> None:
        self.subnet_file = subnet_file


def _conf(backend: dict, v6: bool = False):
    obj = {"Network": "198.19.0.0/16", "Backend": backend}
    if v6:
        obj |= {"EnableIPv6": True, "IPv6Network": "fd00:198:19::/48"}
    return parse_net_conf(json.dumps(obj))


def _lease(subnet: str, ip: str, btype: str, data, subnet6: str | None = None, v6data=None) -> Lease:
    attrs = LeaseAttrs(ipaddress.IPv4Address(ip), None, btype, data, v6data)
    return Lease(ipaddress.IPv4Network(subnet), attrs, ipaddress.IPv6Network(subnet6) if subnet6 else None)


def test_random_mac_is_locally_administered_unicast():
    for _ in range(50):
        first = parse_mac(random_vtep_mac())[0]
        assert first & 0x02 and not first & 0x01


def test_vxlan_defaults_and_backend_data(tmp_path):
    b = create_backend(_conf({"Type": "vxlan"}), Opts(str(tmp_path / "subnet.env")), IFACE)
    assert isinstance(b, VxlanBackend)
    assert (b.vni, b.port, b.mtu, b.tun_name, b.overhead) == (1, 8472, 1450, "flannel.1", 50)
    attrs = b.lease_attrs()
    assert attrs.to_json() == {
        "PublicIP": "198.18.0.1",
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": b.vtep_mac},
    }


def test_vxlan_options_and_backend_mtu(tmp_path):
    b = VxlanBackend(
        _conf({"Type": "vxlan", "VNI": 7, "Port": 4789, "MTU": 9000}), Opts(str(tmp_path / "s")), IFACE
    )
    assert (b.vni, b.port, b.mtu, b.tun_name) == (7, 4789, 8950, "flannel.7")


def test_vtep_mac_survives_restart_and_is_per_state_dir(tmp_path):
    a1 = VxlanBackend(_conf({"Type": "vxlan"}), Opts(str(tmp_path / "a" / "subnet.env")), IFACE)
    a2 = VxlanBackend(_conf({"Type": "vxlan"}), Opts(str(tmp_path / "a" / "subnet.env")), IFACE)
    other = VxlanBackend(_conf({"Type": "vxlan"}), Opts(str(tmp_path / "b" / "subnet.env")), IFACE)
    assert a1.vtep_mac == a2.vtep_mac != other.vtep_mac
    assert (tmp_path / "a" / "udpflannel-vtep-mac.flannel.1").read_text().strip() == a1.vtep_mac
    bad = tmp_path / "bad"
    bad.write_text("not a mac")
    assert parse_mac(load_or_create_mac(bad))


def test_vxlan_peer_rows(tmp_path):
    b = VxlanBackend(_conf({"Type": "vxlan"}, v6=True), Opts(str(tmp_path / "s")), IFACE)
    mac = "02:aa:00:00:00:02"
    good = _lease(
        "198.19.2.0/24",
        "198.18.0.2",
        "vxlan",
        {"VNI": 1, "VtepMAC": mac},
        "fd00:198:19:2::/64",
        {"VNI": 1, "VtepMAC": mac},
    )
    rows = b.peer_rows(good)
    assert [(r.subnet, r.public_ip, r.vtep_mac) for r in rows] == [
        ("198.19.2.0/24", "198.18.0.2", mac),
        ("fd00:198:19:2::/64", "198.18.0.2", mac),
    ]
    assert b.peer_rows(_lease("198.19.3.0/24", "198.18.0.3", "udp", None)) == []
    assert b.peer_rows(_lease("198.19.3.0/24", "198.18.0.3", "vxlan", {"VNI": 1})) == []
    assert b.peer_rows(_lease("198.19.3.0/24", "198.18.0.3", "vxlan", {"VNI": 2, "VtepMAC": mac})) == []
    assert b.peer_rows(_lease("198.19.3.0/24", "198.18.0.3", "vxlan", "junk")) == []


def test_vxlan_dual_stack_publishes_v6_data(tmp_path):
    iface = ExternalInterface("eth0", 2, 1500, "198.18.0.1", "fd00:198::1", "198.18.0.1", "fd00:198::1")
    b = VxlanBackend(_conf({"Type": "vxlan"}, v6=True), Opts(str(tmp_path / "s")), iface)
    out = b.lease_attrs().to_json()
    assert out["PublicIPv6"] == "fd00:198::1" and out["BackendV6Data"] == out["BackendData"]


def test_udp_backend(tmp_path):
    b = create_backend(_conf({"Type": "udp"}), Opts(str(tmp_path / "s")), IFACE)
    assert isinstance(b, UdpBackend)
    assert (b.port, b.mtu, b.tun_name, b.overhead) == (8285, 1472, "flannel0", 28)
    assert b.lease_attrs().to_json() == {"PublicIP": "198.18.0.1"}  # flannel's udp writes no BackendType
    rows = b.peer_rows(_lease("198.19.2.0/24", "198.18.0.2", "", None))
    assert [(r.subnet, r.public_ip) for r in rows] == [("198.19.2.0/24", "198.18.0.2")]
    assert UdpBackend(_conf({"Type": "udp", "Port": 9000}), Opts(str(tmp_path / "s")), IFACE).port == 9000


@pytest.mark.parametrize("btype", ["vxlan", "udp"])
def test_apply_tracks_peers_and_skips_our_own_lease(tmp_path, btype):
    b = create_backend(_conf({"Type": btype}), Opts(str(tmp_path / "s")), IFACE)
    from udpflannel.lease.model import Event, EventType

    ours = _lease("198.19.1.0/24", "198.18.0.1", btype, {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"})
    peer = _lease("198.19.2.0/24", "198.18.0.2", btype, {"VNI": 1, "VtepMAC": "02:00:00:00:00:02"})
    b.lease = ours
    b.apply([Event(EventType.ADDED, ours), Event(EventType.ADDED, peer)])
    assert list(b.peers) == [peer.key]
    b.apply([Event(EventType.REMOVED, peer)])
    assert b.peers == {}


def test_vxlan_ipv6_underlay_when_both_ends_have_one(tmp_path):
    iface = ExternalInterface("eth0", 2, 1500, "198.18.0.1", "fd00:198::1", "198.18.0.1", "fd00:198::1")
    b = VxlanBackend(_conf({"Type": "vxlan"}, v6=True), Opts(str(tmp_path / "s")), iface)
    assert b.v6_underlay and b.mtu == 1430  # one TUN, IPv6 frames over IPv6: flannel-v6.1's overhead of 70
    mac4, mac6 = "02:aa:00:00:00:02", "02:aa:00:00:00:06"
    attrs = LeaseAttrs(
        ipaddress.IPv4Address("198.18.0.2"),
        ipaddress.IPv6Address("fd00:198::2"),
        "vxlan",
        {"VNI": 1, "VtepMAC": mac4},
        {"VNI": 1, "VtepMAC": mac6},
    )
    lease = Lease(ipaddress.IPv4Network("198.19.2.0/24"), attrs, ipaddress.IPv6Network("fd00:198:19:2::/64"))
    assert [(r.subnet, r.public_ip, r.vtep_mac) for r in b.peer_rows(lease)] == [
        ("198.19.2.0/24", "198.18.0.2", mac4),
        ("fd00:198:19:2::/64", "fd00:198::2", mac6),
    ]
    # Without our own IPv6 underlay, IPv6 subnets ride IPv4 to the same node.
    v4only = VxlanBackend(_conf({"Type": "vxlan"}, v6=True), Opts(str(tmp_path / "s")), IFACE)
    assert not v4only.v6_underlay and v4only.mtu == 1450
    assert v4only.peer_rows(lease)[1].public_ip == "198.18.0.2"


def test_update_peer_map_skips_own_lease_and_reports_changes() -> None:
    import ipaddress

    from udpflannel.backend import update_peer_map
    from udpflannel.lease.model import Event, EventType, Lease, LeaseAttrs

    def lease(n: int) -> Lease:
        attrs = LeaseAttrs(public_ip=ipaddress.IPv4Address(f"198.18.0.{n}"))
        return Lease(subnet=ipaddress.IPv4Network(f"198.19.{n}.0/24"), attrs=attrs)

    own, a, b = lease(1), lease(2), lease(3)
    peers: dict[str, Lease] = {}
    assert update_peer_map(peers, [Event(EventType.ADDED, own), Event(EventType.ADDED, a)], own.key)
    assert set(peers) == {a.key}
    assert not update_peer_map(peers, [Event(EventType.REMOVED, b)], own.key)  # unknown peer: no change
    assert not update_peer_map(peers, [Event(EventType.REMOVED, own)], own.key)
    assert update_peer_map(peers, [Event(EventType.REMOVED, a)], own.key) and peers == {}


def test_direct_routing_judges_peers_again_without_a_lease_event(tmp_path, monkeypatch):
    """A peer that moves behind a router keeps no direct route: the backend's periodic check judges every
    peer again a minute on (with the kernel's fresh answer), and the peer goes back to the tunnel."""
    import time

    from udpflannel.host.peer_routes import DIRECT_TTL, PeerRoutes

    b = VxlanBackend(_conf({"Type": "vxlan", "DirectRouting": True}), Opts(str(tmp_path / "s")), IFACE)
    b.lease = _lease("198.19.1.0/24", "198.18.0.1", "vxlan", {"VNI": 1, "VtepMAC": "02:00:00:00:00:01"})
    peer = _lease("198.19.2.0/24", "198.18.0.2", "vxlan", {"VNI": 1, "VtepMAC": "02:00:00:00:00:02"})
    b.peers = {peer.key: peer}
    b.direct = PeerRoutes("eth0")
    answer = {"dev": "eth0", "gateway": None}
    monkeypatch.setattr(b.direct.host, "route_to", lambda ip: dict(answer))
    kept: list[list] = []
    monkeypatch.setattr(b.direct, "set", lambda routes: kept.append(routes))
    monkeypatch.setattr(b.direct, "check", lambda: None)
    b.direct.set(b._direct_routes())
    assert [(r.dst, r.gateway) for r in kept[-1]] == [("198.19.2.0/24", "198.18.0.2")]
    answer["gateway"] = "198.18.0.9"  # the underlay changed; no lease event follows
    b.check()
    assert len(kept) == 1  # not yet: judged once a minute
    clock = time.monotonic() + DIRECT_TTL + 1
    monkeypatch.setattr(time, "monotonic", lambda: clock)
    b.check()
    assert kept[-1] == []
