"""Topology files: the shipped containerlab files parse, inheritance works as containerlab's, bad files fail
with one clear line naming the field."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from udpflannel.lab import topology
from udpflannel.lab.topology import TopologyError

REPO = Path(__file__).resolve().parents[2]
CLAB = REPO / "containerlab"

GOOD = textwrap.dedent(
    """\
    name: t
    topology:
      defaults:
        env: {FLANNELD_IFACE: eth1, FLANNELD_IP_MASQ: false}
        labels:
          udpflannel.net-conf: '{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}'
      nodes:
        a: {kind: linux, labels: {udpflannel.underlay-ip: 198.18.0.1/16}}
        b: {kind: linux, labels: {udpflannel.underlay-ip: 198.18.0.2/16, udpflannel.pods: "2"}}
        sw: {kind: bridge}
      links:
        - endpoints: ["a:eth1", "sw:p1"]
        - endpoints: ["b:eth1", "sw:p2"]
    """
)


@pytest.mark.parametrize(
    ("file", "backend"),
    [
        ("three-node.clab.yml", "vxlan"),
        ("three-node-udp.clab.yml", "udp"),
        ("three-node-wireguard.clab.yml", "wireguard"),
        ("three-node-host-gw.clab.yml", "host-gw"),
        ("three-node-direct.clab.yml", "vxlan"),
    ],
)
def test_shipped_topologies_parse(file: str, backend: str) -> None:
    topo = topology.load(CLAB / file)
    assert topo.backend == backend
    assert topo.network == ipaddress.IPv4Network("198.19.0.0/16")
    assert [n.name for n in topo.agents] == ["node1", "node2", "node3"]
    assert [str(n.underlay) for n in topo.agents] == ["198.18.0.1/16", "198.18.0.2/16", "198.18.0.3/16"]
    assert [n.name for n in topo.bridges] == ["br-underlay"]
    for node in topo.agents:
        assert node.env["FLANNELD_IFACE"] == "eth1"
        assert node.env["FLANNELD_IP_MASQ"] == "false"
        assert node.pods == 2
    # Every agent is wired to the one underlay switch.
    assert {(link.a.node, link.b.node) for link in topo.links} == {
        (f"node{i}", "br-underlay") for i in (1, 2, 3)
    }


def test_inheritance_defaults_kind_node() -> None:
    text = GOOD.replace(
        "  nodes:\n",
        "  kinds:\n"
        "    linux: {env: {FLANNELD_IP_MASQ: true, X: kind}, labels: {udpflannel.pods: '3'}}\n"
        "  nodes:\n",
    )
    text = text.replace("b: {kind: linux, labels:", "b: {kind: linux, env: {X: node}, labels:")
    topo = topology.parse(text)
    a, b = topo.nodes["a"], topo.nodes["b"]
    assert a.env == {"FLANNELD_IFACE": "eth1", "FLANNELD_IP_MASQ": "true", "X": "kind"}
    assert b.env["X"] == "node"
    assert (a.pods, b.pods) == (3, 2)
    assert topo.nodes["sw"].underlay is None


def test_defaults_and_point_to_point() -> None:
    text = textwrap.dedent(
        """\
        name: p2p
        topology:
          defaults:
            labels: {udpflannel.net-conf: '{"network": "198.19.0.0/20"}'}
          nodes:
            a: {kind: linux, labels: {udpflannel.underlay-ip: 198.18.1.1/24}}
            b: {kind: linux, labels: {udpflannel.underlay-ip: 198.18.1.2/24}}
          links:
            - endpoints: ["a:eth1", "b:eth1"]
        """
    )
    topo = topology.parse(text)
    # Keys match case-insensitively; a missing Backend means udp (flannel's rule); one pod, eth1 by default.
    assert topo.network == ipaddress.IPv4Network("198.19.0.0/20")
    assert topo.backend == "udp"
    assert [(n.iface, n.pods) for n in topo.agents] == [("eth1", 1), ("eth1", 1)]
    assert topo.bridges == []


BAD = [
    ("not yaml", "name: [unclosed\n", "not valid YAML at line"),
    ("not a mapping", "- a\n- b\n", "expected a mapping"),
    ("no name", GOOD.replace("name: t\n", ""), "'name' must be a non-empty string"),
    ("no nodes", "name: t\ntopology: {links: []}\n", "'topology.nodes' must be a non-empty mapping"),
    (
        "bad kind",
        GOOD.replace("sw: {kind: bridge}", "sw: {kind: srl}"),
        "topology.nodes.sw.kind: 'srl' is not supported",
    ),
    (
        "bad node name",
        GOOD.replace("a: {kind", "Node_A: {kind").replace('"a:eth1"', '"Node_A:eth1"'),
        "node names must be",
    ),
    (
        "no underlay",
        GOOD.replace("labels: {udpflannel.underlay-ip: 198.18.0.1/16}", "labels: {}"),
        "'udpflannel.underlay-ip' is required",
    ),
    ("unsafe underlay", GOOD.replace("198.18.0.1/16", "10.0.0.1/16"), "outside 198.18.0.0/15"),
    ("bad underlay", GOOD.replace("198.18.0.1/16", "198.18.0.300/16"), "is not an IPv4 address/prefix"),
    (
        "bad pods",
        GOOD.replace('udpflannel.pods: "2"', 'udpflannel.pods: "many"'),
        "udpflannel.pods: 'many' must be a number",
    ),
    (
        "too many pods",
        GOOD.replace('udpflannel.pods: "2"', 'udpflannel.pods: "9"'),
        "must be a number from 0 to 8",
    ),
    ("no net-conf", GOOD.replace("udpflannel.net-conf", "other"), "'udpflannel.net-conf' is required"),
    ("net-conf not json", GOOD.replace('{"Network"', "{Network"), "udpflannel.net-conf: not JSON"),
    ("net-conf unsafe", GOOD.replace("198.19.0.0/16", "10.244.0.0/16"), "must lie inside 198.19.0.0/16"),
    (
        "net-conf bad backend",
        GOOD.replace('"Type": "vxlan"', '"Type": "ipsec"'),
        "Backend.Type 'ipsec' is not supported",
    ),
    (
        "net-conf bad subnetlen",
        GOOD.replace('"Network": "198.19.0.0/16"', '"Network": "198.19.0.0/16", "SubnetLen": 40'),
        "SubnetLen",
    ),
    ("net-conf no network", GOOD.replace('"Network": "198.19.0.0/16", ', ""), "'Network' is required"),
    (
        "env not mapping",
        GOOD.replace("env: {FLANNELD_IFACE: eth1, FLANNELD_IP_MASQ: false}", "env: [a]"),
        "env must be a mapping",
    ),
    (
        "env nested",
        GOOD.replace("FLANNELD_IP_MASQ: false", "FLANNELD_IP_MASQ: {a: 1}"),
        "env.FLANNELD_IP_MASQ must be a scalar",
    ),
    ("link unknown node", GOOD.replace('"b:eth1", "sw:p2"', '"c:eth1", "sw:p2"'), "unknown node 'c'"),
    (
        "link bad endpoint",
        GOOD.replace('"b:eth1", "sw:p2"', '"b-eth1", "sw:p2"'),
        "must look like 'node:iface'",
    ),
    (
        "link one endpoint",
        GOOD.replace('["b:eth1", "sw:p2"]', '["b:eth1"]'),
        "'endpoints' must be a list of two",
    ),
    ("link reused", GOOD.replace('"sw:p2"', '"sw:p1"'), "endpoint 'sw:p1' is used by two links"),
    (
        "iface unwired",
        GOOD.replace('"b:eth1", "sw:p2"', '"b:eth2", "sw:p2"'),
        "node b: its underlay interface b:eth1",
    ),
    (
        "duplicate address",
        GOOD.replace("198.18.0.2/16", "198.18.0.1/16"),
        "underlay address 198.18.0.1 is a's too",
    ),
    (
        "two segments",
        GOOD.replace("198.18.0.2/16", "198.18.1.2/24"),
        "is not on 198.18.0.0/16 like the others",
    ),
    ("no links", GOOD.split("  links:")[0], "'topology.links' must be a non-empty list"),
]


@pytest.mark.parametrize(("text", "message"), [(t, m) for _, t, m in BAD], ids=[name for name, _, _ in BAD])
def test_bad_topologies_fail_with_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        topology.parse(text, source="bad.clab.yml")
    error = str(info.value)
    assert message in error
    assert error.startswith("bad.clab.yml: ")
    assert "\n" not in error


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=r"nothere\.yml: cannot read: No such file"):
        topology.load(tmp_path / "nothere.yml")
