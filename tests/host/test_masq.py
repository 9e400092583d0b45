"""host/masq.py: flanneld's FLANNEL-POSTRTG / FLANNEL-FWD rules (spec/flannel.md), as iptables and as
nftables, applied inside throwaway namespaces: in place after ensure(), put back after someone deletes one,
gone after remove(), and a pod's ping to an address outside the cluster network leaves masqueraded."""

from __future__ import annotations

import ipaddress
import json
import os
import sys

import pytest

from udpflannel.host.masq import Family, forward_rules, nft_script, postrouting_rules
from udpflannel.lab.netns import Lab, Netns

V4 = Family(ipaddress.ip_network("198.19.0.0/16"), ipaddress.ip_network("198.19.5.0/24"))
V6 = Family(ipaddress.ip_network("fd00:198::/48"), ipaddress.ip_network("fd00:198:0:5::/64"))


def test_postrouting_rules_return_inside_the_network_and_masquerade_what_leaves() -> None:
    rules = [" ".join(r) for r in postrouting_rules(V4)]
    assert rules == [
        "-m mark --mark 0x4000/0x4000 -j RETURN",
        "-s 198.19.5.0/24 -d 198.19.0.0/16 -j RETURN",
        "-s 198.19.0.0/16 -d 198.19.5.0/24 -j RETURN",
        "! -s 198.19.0.0/16 -d 198.19.5.0/24 -j RETURN",
        "-s 198.19.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
        "! -s 198.19.0.0/16 -d 198.19.0.0/16 -j MASQUERADE --random-fully",
    ]
    assert postrouting_rules(V6, fully_random=False)[4] == [
        *("-s", "fd00:198::/48", "!", "-d", "ff00::/8"),
        *("-j", "MASQUERADE", "--random"),
    ]
    assert forward_rules(V4) == [
        ["-s", "198.19.0.0/16", "-j", "ACCEPT"],
        ["-d", "198.19.0.0/16", "-j", "ACCEPT"],
    ]


def test_forward_rules_accept_the_tunnel_tap_in_both_families() -> None:
    assert forward_rules(V4, "flannel.1-tx")[-1] == ["-i", "flannel.1-tx", "-j", "ACCEPT"]
    assert forward_rules(V6, "flannel.1-tx")[-1] == ["-i", "flannel.1-tx", "-j", "ACCEPT"]  # (IPv6 peers)
    tap = 'iifname "flannel.1-tx" accept'
    assert tap in nft_script(V4, masq=False, forward=True, accept_iif="flannel.1-tx")
    assert tap in nft_script(V6, masq=False, forward=True, accept_iif="flannel.1-tx")


def test_nft_script_holds_the_same_logic() -> None:
    script = nft_script(V6, masq=True, forward=False)
    assert "table ip6 flannel-ipv6 {" in script and "chain forward" not in script
    assert "ip6 saddr fd00:198::/48 ip6 daddr != ff00::/8 masquerade fully-random" in script
    assert "meta mark & 0x4000 == 0x4000 return" in script
    assert "chain postrtg" not in nft_script(V4, masq=False, forward=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

# Runs inside the namespace: apply, check, damage, repair, remove; prints what it saw as JSON.
SCRIPT = r"""
import ipaddress, json, subprocess, sys
from udpflannel.host.masq import Family, Rules
nft = sys.argv[1] == "nft"
fams = [Family(ipaddress.ip_network("198.19.0.0/16"), ipaddress.ip_network("198.19.5.0/24")),
        Family(ipaddress.ip_network("fd00:198::/48"), ipaddress.ip_network("fd00:198:0:5::/64"))]
def dump():
    if nft:
        return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    return "".join(subprocess.run([t, "-t", tb], capture_output=True, text=True).stdout
                   for t in ("iptables-save", "ip6tables-save") for tb in ("nat", "filter"))
r = Rules(fams, masq=True, forward=True, nftables=nft, accept_iif="flannel.1-tx")
out = {"first": r.ensure(), "again": r.ensure(), "applied": dump()}
if nft:
    subprocess.run(["nft", "delete", "chain", "ip", "flannel-ipv4", "postrtg"], check=True)
else:
    subprocess.run(["iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "-s", "198.19.0.0/16", "!", "-d",
                    "224.0.0.0/4", "-j", "MASQUERADE", "--random-fully"], check=True)
out["damaged"] = dump()
out["repaired"] = r.ensure()
out["after_repair"] = dump()
out["repairs"] = r.repairs
r.remove()
out["removed"] = dump()
print(json.dumps(out))
"""


@needs_root
@pytest.mark.parametrize("kind", ["iptables", "nft"])
def test_rules_applied_repaired_and_removed(kind: str) -> None:
    with Lab() as lab:
        ns = lab.netns("masq")
        out = json.loads(ns.exec(sys.executable, "-c", SCRIPT, kind, timeout=60))
    assert out["first"] is True and out["again"] is False
    masq4 = (
        "-A FLANNEL-POSTRTG -s 198.19.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully"
        if kind == "iptables"
        else "ip saddr 198.19.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random"
    )
    masq6 = (
        "fd00:198::/48" if kind == "iptables" else "ip6 saddr fd00:198::/48 ip6 daddr != ff00::/8 masquerade"
    )
    assert masq4 in out["applied"] and masq6 in out["applied"]
    forward = (
        '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD' if kind == "iptables" else ""
    )
    assert forward in out["applied"]
    # the datapath's tunnel TAP: its forwarded frames are accepted, IPv4 and IPv6 (peers over IPv6)
    tap = 'iifname "flannel.1-tx" accept' if kind == "nft" else "-A FLANNEL-FWD -i flannel.1-tx -j ACCEPT"
    assert out["applied"].count(tap) == 2
    assert masq4 not in out["damaged"]
    assert out["repaired"] is True and out["repairs"] == 2

    # (nft lists a table made again after the others, iptables-save stamps the time: compare the rules)
    def rules(dump: str) -> list[str]:
        return sorted(ln for ln in dump.splitlines() if not ln.startswith("#"))

    assert rules(out["after_repair"]) == rules(out["applied"])
    assert "FLANNEL" not in out["removed"] and "flannel-ipv" not in out["removed"]


def _ping(ns: Netns, target: str) -> bool:
    return " 0% packet loss" in ns.exec("ping", "-c", "1", "-W", "1", target, check=False, timeout=5)


@needs_root
def test_a_pods_traffic_leaving_the_network_is_masqueraded() -> None:
    """pod 198.19.5.2 -> node (198.19.5.1 | 198.18.0.1) -> outside 198.18.0.2, which has no route back to
    198.19.0.0/16: the ping is answered only when the node masquerades it."""
    with Lab() as lab:
        pod, node, outside = lab.netns("pod"), lab.netns("node"), lab.netns("out")
        lab.veth(pod, node, "198.19.5.2/24", "198.19.5.1/24", name_a="eth0", name_b="cni0")
        lab.veth(node, outside, "198.18.0.1/24", "198.18.0.2/24", name_a="eth1", name_b="eth1")
        pod.exec("ip", "route", "add", "default", "via", "198.19.5.1")
        assert not _ping(pod, "198.18.0.2")
        code = (
            "import ipaddress; from udpflannel.host.masq import Family, Rules; "
            "Rules([Family(ipaddress.ip_network('198.19.0.0/16'), ipaddress.ip_network('198.19.5.0/24'))], "
            "masq=True, forward=True).ensure()"
        )
        node.exec(sys.executable, "-c", code)
        assert _ping(pod, "198.18.0.2")
        # Inside the cluster network nothing is rewritten: the pod's own address reaches a peer's pod.
        rules = node.exec("iptables", "-t", "nat", "-S", "FLANNEL-POSTRTG")
        assert "-s 198.19.5.0/24 -d 198.19.0.0/16 -j RETURN" in rules
        pkts = node.exec("iptables", "-t", "nat", "-L", "FLANNEL-POSTRTG", "-v", "-n", "-x")
        masq_line = next(ln for ln in pkts.splitlines() if "MASQUERADE" in ln and "!224.0.0.0/4" in ln)
        assert int(masq_line.split()[0]) >= 1, pkts
