"""Interface selection as flanneld does it, checked inside a throwaway network namespace."""

from __future__ import annotations

import json
import os
import sys

import pytest

from udpflannel.lab.netns import Lab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

PROBE = """
import json, sys
from udpflannel.host.iface import select_interface, InterfaceError
kw = json.loads(sys.argv[1])
try:
    i = select_interface(**kw)
    print(json.dumps({"name": i.name, "mtu": i.mtu, "public_ip": i.public_ip, "address": i.address,
                      "pyroute2": "pyroute2" in sys.modules}))
except InterfaceError as e:
    print(json.dumps({"error": str(e)}))
"""


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, "198.18.0.1/24", "198.18.0.2/24", name_a="eth1", name_b="eth1", mtu=1400)
        lab.veth(a, b, "198.18.1.1/24", "198.18.1.2/24", name_a="eth2", name_b="eth2")
        a.exec("ip", "route", "add", "default", "via", "198.18.1.2")
        yield lab


def probe(lab: Lab, **kw: object) -> dict:
    out = lab.namespaces["a"].exec(sys.executable, "-c", PROBE, json.dumps(kw))
    return json.loads(out)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, {"name": "eth2", "public_ip": "198.18.1.1", "pyroute2": False}),
        ({"iface": ["eth1"]}, {"name": "eth1", "mtu": 1400, "public_ip": "198.18.0.1"}),
        ({"iface": ["198.18.0.1"]}, {"name": "eth1"}),
        ({"iface": ["nope", "eth1"]}, {"name": "eth1"}),
        ({"iface_regex": ["^eth1$"]}, {"name": "eth1"}),
        ({"iface_regex": [r"198\.18\.1\."]}, {"name": "eth2"}),
        ({"iface_can_reach": "198.18.0.2"}, {"name": "eth1"}),
        (
            {"iface": ["eth1"], "public_ip": "198.18.9.9"},
            {"public_ip": "198.18.9.9", "address": "198.18.0.1"},
        ),
    ],
)
def test_select(lab: Lab, kw: dict, expected: dict) -> None:
    got = probe(lab, **kw)
    assert {k: got.get(k) for k in expected} == expected


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"iface": ["nope"]}, "no interface matches --iface nope"),
        ({"iface_regex": ["("]}, "not a valid regex"),
        ({"iface_regex": ["^wlan"]}, "no interface matches --iface-regex"),
        ({"iface_can_reach": "not-an-address"}, "--iface-can-reach not-an-address is not an IP address"),
        ({"iface": ["eth1"], "want_ipv6": True}, "no global IPv6 address"),
    ],
)
def test_errors(lab: Lab, kw: dict, needle: str) -> None:
    assert needle in probe(lab, **kw)["error"]


def test_no_default_route() -> None:
    with Lab() as lab:
        lab.netns("a")
        out = lab.namespaces["a"].exec(sys.executable, "-c", PROBE, "{}")
        assert "pass --iface" in json.loads(out)["error"]
