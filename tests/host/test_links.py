"""host/links.py in a throwaway namespace: addresses and routes applied through the netlink child, then
undo() leaves the namespace as it was, and the calling process never imported pyroute2."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

from udpflannel.lab.netns import Lab

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("needs root for network namespaces", allow_module_level=True)

REPO = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, subprocess, sys
from udpflannel.host.links import HostConfig, HostError, Route
def sh(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True).stdout
def state():
    return {"addr": sh("ip", "-j", "addr", "show", "dev", "d0"), "route": sh("ip", "route", "show"),
            "route6": sh("ip", "-6", "route", "show", "dev", "d0")}
h = HostConfig()
h.set_link("d0", mtu=1400, up=True)
assert h.link_mtu("d0") == 1400
h.add_address("d0", "198.19.1.0/32")
h.add_address("d0", "198.19.1.0/32")  # twice: idempotent
h.add_address("d0", "fd00:198:19:1::/128")
h.add_route(Route("198.19.0.0/16", "d0", src="198.19.1.0"))
h.add_route(Route("198.19.7.0/24", "d0", gateway="198.19.7.0", onlink=True))
h.add_route(Route("fd00:198:19::/48", "d0"))
during = state()
try:
    h.link_index("nope")
    missing = False
except HostError:
    missing = True
h.undo()
after = state()
# A link that is gone took its routes and addresses along: undo() then starts no netlink child at all.
import udpflannel.host.links as links
spawned = []
class Counting(links.Netlink):
    def __init__(self):
        spawned.append(1)
        super().__init__()
links.Netlink = Counting
g = HostConfig()
g.add_address("d1", "198.19.2.0/32")
g.add_route(Route("198.19.2.0/24", "d1"))
g.close()
subprocess.run(["ip", "link", "del", "d0"], check=True)  # takes its veth peer d1 along
g.undo()
print(json.dumps({"during": during, "after": after, "missing": missing,
                  "pyroute2": "pyroute2" in sys.modules, "spawned": len(spawned)}))
"""


def test_apply_and_undo_leave_nothing_behind():
    with Lab() as lab:
        ns = lab.netns("h")
        # veth, not dummy: the dummy module is not available on every kernel we run on
        ns.exec("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ns.exec("ip", "link", "set", "d1", "up")
        out = json.loads(ns.exec(sys.executable, "-c", SCRIPT, timeout=60))
        # exec() does not pass env; the repo is installed editable in the venv, so the import works.
        during, after = out["during"], out["after"]
        assert "198.19.1.0" in during["addr"] and "fd00:198:19:1::" in during["addr"]
        assert "198.19.0.0/16 dev d0" in during["route"] and "src 198.19.1.0" in during["route"]
        assert "198.19.7.0/24 via 198.19.7.0 dev d0" in during["route"] and "onlink" in during["route"]
        assert "fd00:198:19::/48" in during["route6"]
        assert "198.19.1.0" not in after["addr"] and "fd00:198:19:1::" not in after["addr"]
        assert "198.19." not in after["route"] and "fd00:198:19::/48" not in after["route6"]
        assert out["missing"]
        assert not out["pyroute2"]  # the agent's memory budget: netlink work runs in a child
        assert out["spawned"] == 1  # g's set-up only; its undo() had nothing left to do


BLACKHOLE = r"""
import json, subprocess
from udpflannel.host.links import HostConfig
def sh(*cmd):
    return subprocess.run(list(cmd), capture_output=True, text=True).stdout
h = HostConfig()
added = [h.add_blackhole(c) for c in ("198.19.5.0/24", "fd00:198:0:5::/64", "198.19.5.0/24")]
subprocess.run(["ip", "addr", "add", "198.19.5.1/24", "dev", "d0"], check=True)  # a cni0-like bridge comes up
out = {"added": added, "routes": sh("ip", "route") + sh("ip", "-6", "route"),
       "pod": sh("ip", "route", "get", "198.19.5.7"), "unleased": sh("ip", "route", "get", "198.19.6.7")}
h.undo()
out["after"] = sh("ip", "route") + sh("ip", "-6", "route")
print(json.dumps(out))
"""


def test_blackhole_routes_lie_under_real_ones_and_go_with_undo():
    """--ip-blackhole-route's routes: at a metric no real route is below, so a bridge's connected route for
    the same prefix still wins; a second add is refused without change; undo() removes only ours."""
    with Lab() as lab:
        ns = lab.netns("bh")
        ns.exec("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ns.exec("ip", "link", "set", "d0", "up")
        ns.exec("ip", "link", "set", "d1", "up")
        out = json.loads(ns.exec(sys.executable, "-c", BLACKHOLE, timeout=60))
    assert out["added"] == [True, True, False]
    assert "blackhole 198.19.5.0/24 proto static metric 65535" in out["routes"]
    assert "blackhole fd00:198:0:5::/64" in out["routes"]
    assert "dev d0" in out["pod"]  # the connected route, not the blackhole
    assert "198.19.5.0/24 dev d0 proto kernel" in out["after"] and "blackhole" not in out["after"]
