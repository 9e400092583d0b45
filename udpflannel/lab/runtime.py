"""Builds and removes a running lab: node namespaces, the underlay, one agent per node, and pod namespaces.

A lab lives in a state directory (`<root>/<prefix>/`: state.json, leases.db, net-conf.json, one folder per
node with subnet.env and agent.log), so `down` from another process can remove everything `up` made. Pods are
wired as flannel's CNI does it (a cni0 bridge holding FLANNEL_SUBNET's first address, pods on veths with a
default route via it), sized by FLANNEL_MTU from the agent's subnet.env.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from udpflannel.lab.netns import (
    SWITCH_DEV,
    Lab,
    LabError,
    Netns,
    check_safe_address,
    leftover_namespaces,
    make_switch,
    run,
    run_prefix,
)
from udpflannel.lab.topology import Node, Topology
from udpflannel.subnet import read_subnet_env

STATE_ROOT = Path("/run/udpflannel-lab")
STATE_FILE = "state.json"
CNI_BRIDGE = "cni0"  # flannel's CNI bridge name
POD_IFACE = "eth0"
HEALTHZ_PORT = 9180  # the agents' /metrics, on the node namespace's loopback only
LEASE_TIMEOUT = 20.0
STOP_TIMEOUT = 3.0
TUNNEL_KINDS = ("tun", "vxlan", "wireguard")  # link kinds that carry the cluster network out of a node


@dataclass
class PodState:
    name: str
    ns: str
    ip: str  # without prefix
    host_veth: str


@dataclass
class NodeState:
    name: str
    ns: str
    underlay: str  # address/prefix on iface
    iface: str
    pid: int | None = None
    subnet: str | None = None  # the lease, e.g. 198.19.5.0/24
    gateway: str | None = None  # cni0's address (FLANNEL_SUBNET's address)
    mtu: int | None = None
    pods: list[PodState] = field(default_factory=list)

    @property
    def public_ip(self) -> str:
        return str(ipaddress.IPv4Interface(self.underlay).ip)


@dataclass
class LabState:
    prefix: str
    dir: str
    name: str
    topology: str
    backend: str
    network: str
    namespaces: list[str] = field(default_factory=list)
    nodes: dict[str, NodeState] = field(default_factory=dict)
    created: float = 0.0

    @property
    def path(self) -> Path:
        return Path(self.dir)

    def node_dir(self, node: str) -> Path:
        return self.path / node

    @property
    def db(self) -> Path:
        return self.path / "leases.db"

    def pods(self) -> list[tuple[NodeState, PodState]]:
        return [(n, p) for n in self.nodes.values() for p in n.pods]

    def save(self) -> None:
        tmp = self.path / f".{STATE_FILE}.{secrets.token_hex(3)}"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, self.path / STATE_FILE)

    @classmethod
    def load(cls, directory: str | Path) -> LabState:
        try:
            raw = json.loads((Path(directory) / STATE_FILE).read_text())
            nodes = {
                k: NodeState(**{**v, "pods": [PodState(**p) for p in v["pods"]]})
                for k, v in raw["nodes"].items()
            }
            return cls(**{**raw, "nodes": nodes})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabError(f"{directory}: not a lab state directory ({exc})") from None


@dataclass
class LabRun:
    """A lab made by this process: the saved state plus the in-process handles (so children are reaped)."""

    state: LabState
    lab: Lab

    def close(self) -> list[str]:
        return down(self.state.path, lab=self.lab)

    def __enter__(self) -> LabRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_labs(root: Path = STATE_ROOT) -> list[Path]:
    """State directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if (p / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda p: p.stat().st_mtime)


def agent_command(state: LabState, node: Node) -> list[str]:
    """`udpflannel run` for one node; its flanneld settings arrive through the node's FLANNELD_* env."""
    exe = Path(sys.executable).with_name("udpflannel")
    base = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "import sys; from udpflannel.cli import main; sys.exit(main())"]
    )
    node_dir = state.node_dir(node.name)
    return [
        *base,
        "run",
        "--sqlite-path",
        str(state.db),
        "--subnet-file",
        str(node_dir / "subnet.env"),
        "--net-config-path",
        str(state.path / "net-conf.json"),
        "--iface",
        node.iface,
        "--healthz-ip",
        "127.0.0.1",
        "--healthz-port",
        str(HEALTHZ_PORT),
        *node.extra_args,
    ]


def agent_env(state: LabState, node: Node) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
    env.update(node.env)
    # Each agent keeps its WireGuard key in its own node folder unless the topology says otherwise.
    env.setdefault("WIREGUARD_KEY_FILE", str(state.node_dir(node.name) / "wgkey"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def up(
    topo: Topology,
    *,
    root: Path = STATE_ROOT,
    lease_timeout: float = LEASE_TIMEOUT,
    agent: Callable[[LabState, Node], list[str]] | None = None,
    log: Callable[[str], None] = print,
) -> LabRun:
    """Build the lab and start the agents; wait (bounded) for every lease, then wire the pods.

    Nodes whose agent got no lease in time have no pods; the caller decides whether that is fatal. Any
    exception while building removes everything made so far before it propagates. `agent` builds each
    node's command line (default: agent_command, the real `udpflannel run`).
    """
    prefix = run_prefix()
    directory = root / prefix
    directory.mkdir(parents=True, mode=0o755)
    state = LabState(
        prefix=prefix,
        dir=str(directory),
        name=topo.name,
        topology=str(topo.path or ""),
        backend=topo.backend,
        network=str(topo.network),
        created=time.time(),
    )
    lab = Lab(prefix)
    labrun = LabRun(state, lab)
    try:
        (directory / "net-conf.json").write_text(json.dumps(topo.net_conf, indent=1) + "\n")
        state.save()
        _build_underlay(topo, state, lab, log)
        _start_agents(topo, state, lab, agent or agent_command, log)
        _wait_for_leases(state, lab, lease_timeout, log)
        for node in state.nodes.values():
            if node.subnet is not None:
                _wire_pods(topo.nodes[node.name], node, state, lab)
        state.save()
    except BaseException:
        labrun.close()
        raise
    return labrun


def _build_underlay(topo: Topology, state: LabState, lab: Lab, log) -> None:
    for node in topo.nodes.values():
        ns = lab.netns(node.name)
        state.namespaces.append(ns.name)
        state.save()  # before the next step: `down` must know every namespace even if we crash now
        if node.kind == "bridge":
            make_switch(ns)
        else:
            assert node.underlay is not None
            state.nodes[node.name] = NodeState(
                name=node.name, ns=ns.name, underlay=str(node.underlay), iface=node.iface
            )
    for link in topo.links:
        a, b = topo.nodes[link.a.node], topo.nodes[link.b.node]
        lab.veth(
            lab.namespaces[a.name],
            lab.namespaces[b.name],
            str(a.underlay) if a.kind == "linux" else None,
            str(b.underlay) if b.kind == "linux" else None,
            name_a=link.a.iface,
            name_b=link.b.iface,
        )
        for end, iface in ((a, link.a.iface), (b, link.b.iface)):
            if end.kind == "bridge":
                lab.namespaces[end.name].exec("ip", "link", "set", iface, "master", SWITCH_DEV)
    segment = topo.agents[0].underlay.network if topo.agents[0].underlay else "?"
    log(f"lab {state.prefix}: {len(topo.agents)} nodes on {segment}, state in {state.dir}")


def _start_agents(
    topo: Topology, state: LabState, lab: Lab, agent: Callable[[LabState, Node], list[str]], log
) -> None:
    for node in topo.agents:
        node_dir = state.node_dir(node.name)
        node_dir.mkdir(mode=0o755)
        with open(node_dir / "agent.log", "wb") as logf:
            proc = lab.namespaces[node.name].popen(
                *agent(state, node), stdout=logf, stderr=subprocess.STDOUT, env=agent_env(state, node)
            )
        state.nodes[node.name].pid = proc.pid
        state.save()
    log(f"lab {state.prefix}: started {len(topo.agents)} agents (udpflannel run, backend {topo.backend})")


def _wait_for_leases(state: LabState, lab: Lab, timeout: float, log) -> None:
    deadline = time.monotonic() + timeout
    pending = set(state.nodes)
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            env = read_subnet_env(state.node_dir(name) / "subnet.env")  # written atomically by the agent
            if env is not None and env.subnet is not None and env.mtu is not None:
                node = state.nodes[name]
                node.subnet, node.gateway, node.mtu = str(env.subnet.network), str(env.subnet.ip), env.mtu
                pending.discard(name)
            elif _agent_exited(lab, state.nodes[name]):
                pending.discard(name)  # dead agents never write it; say so below rather than wait
        if pending:
            time.sleep(0.1)
    for name, node in state.nodes.items():
        if node.subnet is None:
            why = "agent exited" if not agent_alive(state, node) else f"no subnet.env after {timeout:.0f} s"
            log(f"lab {state.prefix}: node {name} has no lease ({why}); last agent log lines:")
            for line in agent_log_tail(state, name):
                log(f"    {line}")
            if agent_alive(state, node) and node.pid is not None:
                for line in agent_stack(node.pid):
                    log(f"    {line}")


def agent_stack(pid: int, lines: int = 12) -> list[str]:
    """Where a stuck agent is (py-spy dump of its main thread), so `lab up` shows why, not only that."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return []
    try:
        proc = subprocess.run(
            [str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=3
        )
    except subprocess.TimeoutExpired:
        return ["(py-spy dump timed out)"]
    out = (proc.stdout or proc.stderr).splitlines()
    return ["py-spy dump of the stuck agent:", *out[:lines]] if out else []


def _wire_pods(topo_node: Node, node: NodeState, state: LabState, lab: Lab) -> None:
    """flannel's CNI, simplified: bridge cni0 holds the gateway address, a veth per pod, FLANNEL_MTU."""
    assert node.subnet is not None and node.gateway is not None and node.mtu is not None
    host = lab.namespaces[node.name]
    check_safe_address(f"{node.gateway}/32")
    prefixlen = ipaddress.IPv4Network(node.subnet).prefixlen
    host.exec("ip", "link", "add", CNI_BRIDGE, "mtu", str(node.mtu), "type", "bridge")
    host.exec("ip", "addr", "add", f"{node.gateway}/{prefixlen}", "dev", CNI_BRIDGE)
    host.exec("ip", "link", "set", CNI_BRIDGE, "up")
    gateway = ipaddress.IPv4Address(node.gateway)
    for i in range(topo_node.pods):
        pod_ip = gateway + 1 + i
        pod_name = f"{node.name}-p{i}"
        pod_ns = lab.netns(pod_name)
        state.namespaces.append(pod_ns.name)
        state.save()
        host_veth = f"veth{node.name[:6]}p{i}"
        lab.veth(
            pod_ns,
            host,
            f"{pod_ip}/{prefixlen}",
            None,
            name_a=POD_IFACE,
            name_b=host_veth,
            mtu=node.mtu,
            wire_mode=False,
        )
        host.exec("ip", "link", "set", host_veth, "master", CNI_BRIDGE)
        pod_ns.exec("ip", "route", "add", "default", "via", node.gateway)
        node.pods.append(PodState(name=pod_name, ns=pod_ns.name, ip=str(pod_ip), host_veth=host_veth))


def _agent_exited(lab: Lab, node: NodeState) -> bool:
    """Whether the agent we started has exited. Asks the Popen handle, not /proc: right after the fork, and
    before the exec, /proc/<pid>/cmdline is still ours, which agent_alive() would take for a dead agent."""
    for ns in lab.namespaces.values():
        for proc in ns.processes:
            if proc.pid == node.pid:
                return proc.poll() is not None
    return node.pid is None


def agent_alive(state: LabState, node: NodeState) -> bool:
    """True if the recorded pid still runs *our* agent (its command line names this lab's directory)."""
    if node.pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{node.pid}/cmdline").read_bytes()
    except OSError:
        return False
    return state.dir.encode() in cmdline


def agent_log_tail(state: LabState, node: str, lines: int = 5) -> list[str]:
    try:
        text = (state.node_dir(node) / "agent.log").read_text(errors="replace")
    except OSError:
        return ["(no agent.log)"]
    return text.splitlines()[-lines:] or ["(agent.log is empty)"]


def tunnel_link(ns: str) -> tuple[str, str] | None:
    """(name, kind) of the device carrying the cluster network out of a node: our TUN, or a kernel vxlan or
    wireguard link (a kernel-flannel node); None if the node has none."""
    try:
        links = json.loads(
            run(["ip", "netns", "exec", ns, "ip", "-d", "-j", "link", "show"], timeout=5) or "[]"
        )
    except (LabError, ValueError, subprocess.TimeoutExpired):
        return None
    for link in links:
        kind = link.get("linkinfo", {}).get("info_kind")
        if kind in TUNNEL_KINDS:
            return link.get("ifname"), kind
    return None


def tunnel_device(ns: str) -> str | None:
    found = tunnel_link(ns)
    return found[0] if found else None


def down(directory: str | Path, *, lab: Lab | None = None) -> list[str]:
    """Stop the agents, delete every namespace of the lab and its state directory; returns what it removed.

    Works from the state file alone (another process made the lab) and also on a half-built lab."""
    directory = Path(directory)
    removed: list[str] = []
    try:
        state: LabState | None = LabState.load(directory)
    except LabError:
        state = None
    prefix = state.prefix if state else directory.name
    if state is not None:
        for node in state.nodes.values():
            if agent_alive(state, node):
                assert node.pid is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGTERM)
                removed.append(f"agent {node.name} (pid {node.pid})")
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and any(agent_alive(state, n) for n in state.nodes.values()):
            time.sleep(0.05)
        for node in state.nodes.values():
            if agent_alive(state, node):
                assert node.pid is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
    if lab is not None:
        lab.close()  # reaps the children this process started
    names = set(state.namespaces if state else []) | set(leftover_namespaces(prefix))
    cleanup = Lab(prefix)
    for name in names:
        cleanup.namespaces[name] = Netns(name)
    cleanup.close()  # kills whatever still runs inside, then deletes the namespace (and its links)
    removed.extend(f"netns {n}" for n in sorted(names))
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"dir {directory}")
    return removed
