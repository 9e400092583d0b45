"""Tracing through a real lab whose nodes forward with kernel VXLAN set up exactly as flanneld's vxlan backend
does (flannel.1, onlink routes, permanent neighbours, fdb): the trace and the demo's checks are tested against
a dataplane known to work, independent of our agent. Root only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_agent import fake_agent

from udpflannel.lab import kernel_vxlan, topology
from udpflannel.lab.demo import DemoReport, check_lab
from udpflannel.lab.netns import leftover_namespaces
from udpflannel.lab.runtime import LabRun, up
from udpflannel.trace.tracer import pick_pods, trace

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")

REPO = Path(__file__).resolve().parents[2]
THREE_NODE = REPO / "containerlab" / "three-node.clab.yml"


def vtep_mac(i: int) -> str:
    return f"02:5a:00:00:01:{i:02x}"


def kernel_vxlan_lab(labrun: LabRun) -> None:
    """flanneld's vxlan backend, by hand: flannel.1 per node, and for each peer route + neighbour + fdb."""
    nodes = list(labrun.state.nodes.values())
    for i, node in enumerate(nodes, 1):
        ns = labrun.lab.namespaces[node.name]
        vtep = node.subnet.replace("/24", "/32")
        kernel_vxlan.add_device(ns, mac=vtep_mac(i), local=node.public_ip, address=vtep, dev=node.iface)
    for node in nodes:
        ns = labrun.lab.namespaces[node.name]
        for j, peer in enumerate(nodes, 1):
            if peer is not node:
                gw = peer.subnet.split("/")[0]
                kernel_vxlan.add_peer(
                    ns, subnet=peer.subnet, vtep=gw, mac=vtep_mac(j), public_ip=peer.public_ip
                )


@pytest.fixture(scope="module")
def vxlan_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    root = tmp_path_factory.mktemp("labs")
    labrun = up(topology.load(THREE_NODE), root=root, agent=fake_agent, log=lambda _: None)
    try:
        kernel_vxlan_lab(labrun)
        yield labrun
    finally:
        labrun.close()
        assert leftover_namespaces(labrun.state.prefix) == []


def test_trace_follows_the_probe_through_every_hop(vxlan_lab: LabRun) -> None:
    result = trace(vxlan_lab.state)
    assert result.replied, result.ping_output
    wheres = [h.hop.where for h in result.hops]
    assert wheres == [
        "node1-p0 eth0",
        "node1 cni0",
        "node1 flannel.1",
        "node1 eth1",
        "node2 eth1",
        "node2 flannel.1",
        "node2 cni0",
        "node2-p0 eth0",
    ]
    assert result.ok and result.seen == 8, result.format()
    # On the underlay: outer IP between the nodes, VXLAN VNI 1, inner Ethernet to node2's VtepMAC, pod IPs.
    for hop in result.hops[3:5]:
        d = hop.dissection
        assert d is not None and d.encapsulation == "vxlan"
        assert (d.find("IPv4", 0).fields["src"], d.find("IPv4", 0).fields["dst"]) == (
            "198.18.0.1",
            "198.18.0.2",
        )
        assert d.find("UDP", 0).fields["dport"] == 8472
        assert d.find("VXLAN").fields["vni"] == 1
        assert d.find("Ethernet", 1).fields["dst"] == vtep_mac(2)
        inner = d.find("IPv4", 1).fields
        assert (inner["src"], inner["dst"]) == ("198.19.1.2", "198.19.2.2")
        assert d.find("ICMP", 1).fields["type_name"] == "echo-request"
    # Each routing node takes one from the TTL: 64 leaving the pod, 63 after node1, 62 after node2.
    text = result.format()
    assert "inner TTL: 64 at node1-p0 eth0 → 64 at node1 cni0 → 63 at node1 flannel.1" in text
    assert "62 at node2-p0 eth0" in text
    assert "seen at 8/8 hops; echo reply received" in text
    assert all(h.pcap.exists() for h in result.hops)


def test_trace_reports_a_broken_path_honestly(vxlan_lab: LabRun) -> None:
    node1, node3 = vxlan_lab.lab.namespaces["node1"], vxlan_lab.lab.namespaces["node3"]
    node3.exec("ip", "link", "set", "vethnode3p1", "down")  # unplug pod node3-p1 from its bridge
    try:
        lost = trace(vxlan_lab.state, "node1-p0", "node3-p1")
    finally:
        node3.exec("ip", "link", "set", "vethnode3p1", "up")
    # The request crosses the tunnel to node3 but never reaches the unplugged pod (node3 may still be
    # resolving its MAC, so whether it shows up on cni0 depends on node3's neighbour cache).
    assert not lost.replied and not lost.ok
    seen = [h.frame is not None for h in lost.hops]
    assert seen[:6] == [True] * 6 and seen[7] is False, lost.format()
    assert "node3-p1 eth0: NOT SEEN" in lost.format()

    node1.exec("ip", "link", "set", "flannel.1", "down")
    try:
        broken = trace(vxlan_lab.state, "node1-p0", "node3-p1")
    finally:
        # Link down flushed node1's routes and neighbours through flannel.1: put flanneld's state back.
        node1.exec("ip", "link", "set", "flannel.1", "up")
        for j, peer in ((2, "198.19.2.0"), (3, "198.19.3.0")):
            node1.exec("ip", "route", "replace", f"{peer}/24", "via", peer, "dev", "flannel.1", "onlink")
            node1.exec(
                "ip", "neigh", "replace", peer, "lladdr", vtep_mac(j), "dev", "flannel.1", "nud", "permanent"
            )
    assert not broken.replied
    assert broken.hops[2].error is not None and "not up" in broken.hops[2].error
    assert "node1 flannel.1: NOT CAPTURED" in broken.format()
    assert [h.frame is not None for h in broken.hops] == [True, True] + [False] * 6
    assert trace(vxlan_lab.state, "node1-p0", "node3-p1").ok  # and the path works again


def test_pick_pods_rejects_bad_choices(vxlan_lab: LabRun) -> None:
    with pytest.raises(ValueError, match="same node"):
        pick_pods(vxlan_lab.state, "node1-p0", "node1-p1")
    with pytest.raises(ValueError, match="no pod 'nope'"):
        pick_pods(vxlan_lab.state, "nope", None)
    s, d = pick_pods(vxlan_lab.state, "node2-p1", None)
    assert (s[1].name, d[0].name) == ("node2-p1", "node1")


def test_demo_checks_on_a_working_dataplane(vxlan_lab: LabRun) -> None:
    import time

    report = DemoReport()
    lines: list[str] = []
    check_lab(vxlan_lab, report, lines.append, deadline=time.monotonic() + 50)
    text = "\n".join(lines)
    assert report.failed == [], text
    assert len(report.leases) == 3
    assert report.matrix and all(report.matrix.values()) and len(report.matrix) == 6
    assert report.throughput_bps is not None and report.throughput_bps > 1e6
    assert report.trace_text is not None and "seen at 8/8 hops" in report.trace_text
    assert "198.19.1.0/24" in text and "reachability" in text and "Mbit/s" in text
