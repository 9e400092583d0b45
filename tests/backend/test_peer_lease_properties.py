"""Hypothesis properties of peer leases as any store may hand them over: whatever JSON another node (or
anyone with write access to etcd or a Node's annotations) publishes, parsing it raises ValueError or
nothing, and turning it into peer-table rows (vxlan, udp), WireGuard peers or host-gw routes (only inside
the cluster network, never over our own subnet) never raises: an unusable
lease is logged and skipped, and the agent keeps running for the peers that are fine."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpflannel.backend import ExternalInterface
from udpflannel.backend.udp import UdpBackend
from udpflannel.backend.vxlan import VxlanBackend
from udpflannel.backend.wireguard import WgDevice, peer_config
from udpflannel.codec.vxlan import parse_mac
from udpflannel.codec.wireguard import crypto
from udpflannel.config import parse_net_conf
from udpflannel.host.peer_routes import peer_routes
from udpflannel.lease.model import Lease, LeaseAttrs

IFACE = ExternalInterface("eth0", 2, 1500, "198.18.0.1", "fd00:198::1", "198.18.0.1", "fd00:198::1")
PEER_KEY = base64.b64encode(crypto.public_key(bytes(range(1, 33)))).decode()
DEVICES = [
    WgDevice("flannel-wg", 51820, "auto", (4,)),
    WgDevice("flannel-wg-v6", 51821, "ipv6", (6,)),
    WgDevice("flannel-wg", 51820, "auto", (4, 6)),
]

# JSON as Python's json module reads it: Infinity, -Infinity and NaN included (it accepts them).
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["02:aa:bb:cc:dd:ee", "00:11:22:33:44:55", "8472", "1", PEER_KEY, "198.18.0.2", "::"]),
)
FIELDS = ["VNI", "VtepMAC", "PublicKey", "Port", "Type"]
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=8,
)
numbers = st.sampled_from([float("inf"), float("-inf"), float("nan"), 1, 1.0, 0.5, 8472, 51820, 2**64, 0, -1])
backend_data = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "VNI": numbers | json_values,
            "VtepMAC": st.just("02:aa:bb:cc:dd:ee") | json_values,
            "PublicKey": st.just(PEER_KEY) | json_values,
            "Port": numbers | json_values,
        },
    ),
)
attrs_json = st.fixed_dictionaries(
    {},
    optional={
        "PublicIP": st.sampled_from(["198.18.0.2", "0.0.0.0", ""]) | json_values,
        "PublicIPv6": st.sampled_from(["fd00:198::2", "::"]) | json_values,
        "BackendType": st.sampled_from(["vxlan", "udp", "wireguard"]) | json_values,
        "BackendData": backend_data,
        "BackendV6Data": backend_data,
    },
)
subnets = st.sampled_from(
    [
        (ipaddress.IPv4Network("198.19.5.0/24"), None),
        (None, ipaddress.IPv6Network("fd00:198:0:5::/64")),
        (ipaddress.IPv4Network("198.19.5.0/24"), ipaddress.IPv6Network("fd00:198:0:5::/64")),
        (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")),  # a host route taken over
        (ipaddress.IPv4Network("198.19.1.0/24"), None),  # ours (host-gw: never routed to a peer)
    ]
)
NETWORKS = [ipaddress.IPv4Network("198.19.0.0/16"), ipaddress.IPv6Network("fd00:198::/48")]
OURS = [ipaddress.IPv4Network("198.19.1.0/24")]


class Opts:
    def __init__(self, subnet_file: str) -> None:
        self.subnet_file = subnet_file


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    conf = {"Network": "198.19.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:198::/48"}
    made = []
    for btype in ("vxlan", "udp"):
        cfg = parse_net_conf(json.dumps(conf | {"Backend": {"Type": btype}}))
        opts = Opts(str(tmp_path_factory.mktemp(btype) / "subnet.env"))
        made.append((VxlanBackend if btype == "vxlan" else UdpBackend)(cfg, opts, IFACE))
    return made


@pytest.fixture(autouse=True)
def quiet():
    # Every unusable lease is logged; thousands of warnings would only slow the run down.
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _round_trip(obj: dict) -> dict:
    """As a store delivers it: text from the wire, read by json.loads."""
    return json.loads(json.dumps(obj, allow_nan=True))


@settings(max_examples=400, deadline=None)
@given(obj=attrs_json)
def test_lease_attrs_parse_or_say_value_error(obj):
    try:
        attrs = LeaseAttrs.from_json(_round_trip(obj))
    except ValueError:
        return
    # What parsed is what a store can write back (compared as text: NaN is not equal to itself).
    assert LeaseAttrs.loads(attrs.dumps()).dumps() == attrs.dumps()


peer_attrs_json = st.fixed_dictionaries(
    {
        "PublicIP": st.sampled_from(["198.18.0.2", "0.0.0.0"]),
        "BackendType": st.sampled_from(["vxlan", "udp", "wireguard", "host-gw"]),
        "BackendData": backend_data,
    },
    optional={"PublicIPv6": st.just("fd00:198::2"), "BackendV6Data": backend_data},
)


@settings(max_examples=600, deadline=None)
@given(obj=peer_attrs_json, nets=subnets)
def test_any_peer_lease_gives_rows_or_is_skipped(backends, obj, nets):
    attrs = LeaseAttrs.from_json(_round_trip(obj))
    lease = Lease(nets[0], attrs, nets[1], expiration=1e9)
    vxlan, udp = backends
    for row in vxlan.peer_rows(lease):
        assert parse_mac(row.vtep_mac) and ipaddress.ip_address(row.public_ip)
        assert ipaddress.ip_network(row.subnet) in (lease.subnet, lease.ipv6_subnet)
    for row in udp.peer_rows(lease):
        assert ipaddress.ip_network(row.subnet) in (lease.subnet, lease.ipv6_subnet)
    for route in peer_routes(lease, "host-gw", "eth0", NETWORKS, OURS):
        net = ipaddress.ip_network(route.dst)
        assert net in (lease.subnet, lease.ipv6_subnet)
        assert any(net.subnet_of(n) for n in NETWORKS if n.version == net.version)
        assert not any(net.overlaps(o) for o in OURS if o.version == net.version) and route.gateway
    for device in DEVICES:
        peer = peer_config(lease, device, None, 0, have_ipv4=True)
        if peer is not None:
            assert len(base64.b64decode(peer["public_key"])) == crypto.KEY_SIZE
            assert 0 < peer["endpoint"][1] < 65536


@pytest.mark.parametrize(
    "data",
    [
        {"VNI": float("inf"), "VtepMAC": "02:aa:bb:cc:dd:ee"},
        {"VNI": float("nan"), "VtepMAC": "02:aa:bb:cc:dd:ee"},
        {"PublicKey": PEER_KEY, "Port": float("inf")},
        {"PublicKey": PEER_KEY, "Port": float("-inf")},
    ],
)
def test_infinite_numbers_in_backend_data_are_skipped(backends, data):
    """json.loads reads `1e999` (or `Infinity`) as inf, which int() refuses with OverflowError, not
    ValueError: a lease like that once took the agent down."""
    vxlan, _ = backends
    for btype in ("vxlan", "wireguard"):
        attrs = LeaseAttrs.from_json(_round_trip({"PublicIP": "198.18.0.2", "BackendType": btype}))
        attrs = LeaseAttrs(attrs.public_ip, None, btype, json.loads(json.dumps(data)))
        lease = Lease(ipaddress.IPv4Network("198.19.5.0/24"), attrs, None, expiration=1e9)
        assert vxlan.peer_rows(lease) == []
        assert peer_config(lease, DEVICES[0], None, 0) is None


@pytest.mark.parametrize("ip", [3322020354, True, 1.5, ["198.18.0.2"], {"ip": "198.18.0.2"}])
def test_public_ip_must_be_a_string(ip):
    """flannel's Go decoder reads PublicIP from a JSON string only; a number would otherwise become an
    address (3322020354 is 198.18.0.2, true would be 0.0.0.1)."""
    with pytest.raises(ValueError, match="PublicIP"):
        LeaseAttrs.from_json({"PublicIP": ip})
    with pytest.raises(ValueError, match="PublicIPv6"):
        LeaseAttrs.from_json({"PublicIP": "198.18.0.2", "PublicIPv6": ip})
    with pytest.raises(ValueError, match="BackendType"):
        LeaseAttrs.from_json({"PublicIP": "198.18.0.2", "BackendType": ip})
