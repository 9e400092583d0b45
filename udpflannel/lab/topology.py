"""Reads a containerlab topology file into the lab's plan: nodes, underlay links, per-node flanneld settings.

Only what containerlab itself accepts is used, so one file serves both tools: `kind: linux` nodes are
udpflannel nodes, `kind: bridge` nodes are the shared underlay segment, node `env` carries FLANNELD_*
variables (exactly how flanneld reads its flags), and node `labels` prefixed `udpflannel.` carry what only
the lab needs. `defaults` and `kinds` are inherited as containerlab does (defaults < kinds < node).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from udpflannel.config import ConfigError, parse_net_conf
from udpflannel.lab.netns import SAFE_RANGE_V4

LABEL_PREFIX = "udpflannel."
LABEL_UNDERLAY = LABEL_PREFIX + "underlay-ip"  # e.g. "198.18.0.1/16" on the node's FLANNELD_IFACE
LABEL_PODS = LABEL_PREFIX + "pods"  # how many pod namespaces the lab hangs off this node (0..8)
LABEL_NET_CONF = LABEL_PREFIX + "net-conf"  # net-conf.json as a JSON string (usually in defaults.labels)
LABEL_ARGS = LABEL_PREFIX + "args"  # extra `udpflannel run` arguments, space separated
NODE_KINDS = ("linux", "bridge")
MAX_PODS = 8
DEFAULT_PODS = 1
# Interface names are at most 15 characters (IFNAMSIZ - 1); node names become namespace suffixes.
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,11}$")
_IFACE_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,14}$")


class TopologyError(ValueError):
    """The topology file cannot be used; str() is one line naming the file and the offending field."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    node: str
    iface: str

    def __str__(self) -> str:
        return f"{self.node}:{self.iface}"


@dataclass(frozen=True, slots=True)
class Link:
    a: Endpoint
    b: Endpoint


@dataclass(frozen=True, slots=True)
class Node:
    """A udpflannel node (kind linux) or an underlay switch (kind bridge)."""

    name: str
    kind: str
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    underlay: ipaddress.IPv4Interface | None = None  # linux nodes only
    pods: int = 0

    @property
    def iface(self) -> str:
        """The underlay interface the agent uses: FLANNELD_IFACE, as flanneld reads it (default eth1)."""
        return self.env.get("FLANNELD_IFACE", "eth1")

    @property
    def extra_args(self) -> list[str]:
        return self.labels.get(LABEL_ARGS, "").split()


@dataclass(frozen=True, slots=True)
class Topology:
    name: str
    nodes: dict[str, Node]
    links: list[Link]
    net_conf: dict[str, Any]
    path: Path | None = None

    @property
    def agents(self) -> list[Node]:
        """The udpflannel nodes, in file order."""
        return [n for n in self.nodes.values() if n.kind == "linux"]

    @property
    def bridges(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == "bridge"]

    @property
    def backend(self) -> str:
        backend = self.net_conf.get("Backend") or {}
        # flannel treats a missing Backend as udp (spec/flannel.md, net-conf.json).
        return str(backend.get("Type", "udp")).lower()

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.net_conf["Network"])


def load(path: str | Path) -> Topology:
    """Parse and validate a topology file; raises TopologyError with a one-line reason."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, source=str(path), path=path)


def parse(text: str, *, source: str = "<topology>", path: Path | None = None) -> Topology:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise TopologyError(f"{source}: not valid YAML{where}: {problem}") from None

    def fail(msg: str) -> TopologyError:
        return TopologyError(f"{source}: {msg}")

    if not isinstance(doc, dict):
        raise fail("expected a mapping with 'name' and 'topology'")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise fail("'name' must be a non-empty string")
    topo = doc.get("topology")
    if not isinstance(topo, dict):
        raise fail("'topology' must be a mapping with 'nodes' and 'links'")
    defaults = _mapping(topo.get("defaults"), "topology.defaults", fail)
    kinds = _mapping(topo.get("kinds"), "topology.kinds", fail)
    raw_nodes = topo.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        raise fail("'topology.nodes' must be a non-empty mapping of node name to settings")

    nodes: dict[str, Node] = {}
    net_conf_text: str | None = None
    for node_name, raw in raw_nodes.items():
        where = f"topology.nodes.{node_name}"
        if not isinstance(node_name, str) or not _NAME_RE.match(node_name):
            raise fail(
                f"{where}: node names must be 1-12 characters of a-z, 0-9 and '-', starting with a letter"
            )
        raw = _mapping(raw, where, fail)
        kind = raw.get("kind", defaults.get("kind"))
        if kind not in NODE_KINDS:
            raise fail(f"{where}.kind: {kind!r} is not supported (use one of {', '.join(NODE_KINDS)})")
        kind_defaults = _mapping(kinds.get(kind), f"topology.kinds.{kind}", fail)
        env = _merged_strings((defaults, kind_defaults, raw), "env", where, fail)
        labels = _merged_strings((defaults, kind_defaults, raw), "labels", where, fail)
        node = _node(node_name, kind, env, labels, where, fail)
        nodes[node_name] = node
        if kind == "linux" and LABEL_NET_CONF in labels:
            if net_conf_text is not None and labels[LABEL_NET_CONF] != net_conf_text:
                raise fail(
                    f"{where}.labels: {LABEL_NET_CONF} differs between nodes; one cluster, one net-conf"
                )
            net_conf_text = labels[LABEL_NET_CONF]

    links = _links(topo.get("links"), nodes, fail)
    topology = Topology(
        name=name, nodes=nodes, links=links, net_conf=_net_conf(net_conf_text, fail), path=path
    )
    _check_wiring(topology, fail)
    return topology


def _mapping(value: Any, where: str, fail) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail(f"'{where}' must be a mapping")
    return value


def _merged_strings(layers: tuple[dict[str, Any], ...], key: str, where: str, fail) -> dict[str, str]:
    """containerlab merges env and labels from defaults, then the kind, then the node."""
    out: dict[str, str] = {}
    for layer in layers:
        block = layer.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise fail(f"{where}.{key} must be a mapping of names to values")
        for k, v in block.items():
            if isinstance(v, (dict, list)) or v is None:
                raise fail(f"{where}.{key}.{k} must be a scalar value")
            # YAML turns `false` into a bool; flanneld expects the text it would see in the environment.
            out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


def _node(name: str, kind: str, env: dict[str, str], labels: dict[str, str], where: str, fail) -> Node:
    if kind == "bridge":
        return Node(name=name, kind=kind, env=env, labels=labels)
    underlay_text = labels.get(LABEL_UNDERLAY)
    if underlay_text is None:
        raise fail(f"{where}.labels: '{LABEL_UNDERLAY}' is required (e.g. 198.18.0.1/16)")
    try:
        underlay = ipaddress.IPv4Interface(underlay_text)
    except ValueError:
        raise fail(
            f"{where}.labels.{LABEL_UNDERLAY}: {underlay_text!r} is not an IPv4 address/prefix"
        ) from None
    if underlay.ip not in SAFE_RANGE_V4 or underlay.network.prefixlen < SAFE_RANGE_V4.prefixlen:
        raise fail(
            f"{where}.labels.{LABEL_UNDERLAY}: {underlay} is outside {SAFE_RANGE_V4} (lab safety rule)"
        )
    pods_text = labels.get(LABEL_PODS, str(DEFAULT_PODS))
    if not pods_text.isdigit() or int(pods_text) > MAX_PODS:
        raise fail(f"{where}.labels.{LABEL_PODS}: {pods_text!r} must be a number from 0 to {MAX_PODS}")
    iface = env.get("FLANNELD_IFACE", "eth1")
    if not _IFACE_RE.match(iface):
        raise fail(f"{where}.env.FLANNELD_IFACE: {iface!r} must be one interface name (the lab wires it)")
    return Node(name=name, kind=kind, env=env, labels=labels, underlay=underlay, pods=int(pods_text))


def _links(raw: Any, nodes: dict[str, Node], fail) -> list[Link]:
    if not isinstance(raw, list) or not raw:
        raise fail("'topology.links' must be a non-empty list of {endpoints: [a:if, b:if]}")
    links: list[Link] = []
    seen: set[Endpoint] = set()
    for i, item in enumerate(raw):
        where = f"topology.links[{i}]"
        eps = item.get("endpoints") if isinstance(item, dict) else None
        if not isinstance(eps, list) or len(eps) != 2:
            raise fail(f"{where}: 'endpoints' must be a list of two 'node:iface' strings")
        parsed = []
        for text in eps:
            node, sep, iface = str(text).partition(":")
            if not sep or not node or not iface:
                raise fail(f"{where}: endpoint {text!r} must look like 'node:iface'")
            if node not in nodes:
                raise fail(f"{where}: endpoint {text!r} names an unknown node {node!r}")
            if not _IFACE_RE.match(iface):
                raise fail(f"{where}: endpoint {text!r}: interface names are at most 15 characters")
            ep = Endpoint(node, iface)
            if ep in seen:
                raise fail(f"{where}: endpoint {text!r} is used by two links")
            seen.add(ep)
            parsed.append(ep)
        links.append(Link(parsed[0], parsed[1]))
    return links


def _net_conf(text: str | None, fail) -> dict[str, Any]:
    if text is None:
        raise fail(
            f"labels: '{LABEL_NET_CONF}' is required on the linux nodes (usually in topology.defaults)"
        )
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"labels.{LABEL_NET_CONF}: not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(conf, dict):
        raise fail(f"labels.{LABEL_NET_CONF}: must be a JSON object")
    # net-conf keys match case-insensitively (spec/flannel.md); normalise the two the lab reads.
    lowered = {str(k).lower(): k for k in conf}
    for canonical in ("Network", "Backend"):
        if canonical.lower() in lowered and canonical not in conf:
            conf[canonical] = conf.pop(lowered[canonical.lower()])
    if "Network" not in conf:
        raise fail(f"labels.{LABEL_NET_CONF}: 'Network' is required")
    try:
        network = ipaddress.IPv4Network(str(conf["Network"]))
    except ValueError:
        raise fail(f"labels.{LABEL_NET_CONF}: Network {conf['Network']!r} is not an IPv4 network") from None
    if not network.subnet_of(ipaddress.IPv4Network("198.19.0.0/16")):
        raise fail(
            f"labels.{LABEL_NET_CONF}: Network {network} must lie inside 198.19.0.0/16 (lab safety rule)"
        )
    backend = conf.get("Backend")
    if backend is not None and not isinstance(backend, dict):
        raise fail(f"labels.{LABEL_NET_CONF}: Backend must be a JSON object with a Type")
    if isinstance(backend, dict):
        lowered_b = {str(k).lower(): k for k in backend}
        if "type" in lowered_b and "Type" not in backend:
            backend["Type"] = backend.pop(lowered_b["type"])
    try:
        # The agents would refuse it anyway; say so now, with flannel's rules, before anything is built.
        parse_net_conf(json.dumps(conf))
    except ConfigError as exc:
        raise fail(f"labels.{LABEL_NET_CONF}: {exc}") from None
    return conf


def _check_wiring(topo: Topology, fail) -> None:
    """Every agent's underlay interface is wired once, and all agents share one IPv4 segment."""
    wired: dict[Endpoint, Endpoint] = {}
    for link in topo.links:
        wired[link.a] = link.b
        wired[link.b] = link.a
        if topo.nodes[link.a.node].kind == "bridge" and topo.nodes[link.b.node].kind == "bridge":
            raise fail(f"link {link.a} - {link.b}: bridges may not be linked to each other in the lab")
    addresses: dict[ipaddress.IPv4Address, str] = {}
    for node in topo.agents:
        ep = Endpoint(node.name, node.iface)
        if ep not in wired:
            raise fail(f"node {node.name}: its underlay interface {ep} (FLANNELD_IFACE) is in no link")
        assert node.underlay is not None
        if node.underlay.ip in addresses:
            other = addresses[node.underlay.ip]
            raise fail(f"node {node.name}: underlay address {node.underlay.ip} is {other}'s too")
        addresses[node.underlay.ip] = node.name
        first = topo.agents[0].underlay
        assert first is not None
        if node.underlay.network != first.network:
            raise fail(
                f"node {node.name}: underlay {node.underlay} is not on {first.network} like the others"
            )
    for link in topo.links:
        for ep in (link.a, link.b):
            node = topo.nodes[ep.node]
            if node.kind == "linux" and ep.iface != node.iface:
                raise fail(
                    f"link {link.a} - {link.b}: {ep} is not {node.name}'s FLANNELD_IFACE ({node.iface})"
                )
