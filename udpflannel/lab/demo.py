"""`udpflannel lab demo`: bring a lab up, show what works and what does not, take it down again.

Order: up → leases (bounded wait) → subnet table → if every node has a tunnel device: pod-to-pod ping matrix,
a 3 s iperf3, a hop-by-hop trace of one packet → drops → summary → down. Exit status 0 only if everything
this build claims to do worked; a dataplane that is not in this build yet is reported, not faked.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from udpflannel.backend import REGISTRY
from udpflannel.lab import topology
from udpflannel.lab.netns import LabError, run
from udpflannel.lab.runtime import (
    HEALTHZ_PORT,
    STATE_ROOT,
    LabRun,
    LabState,
    NodeState,
    agent_alive,
    tunnel_device,
    up,
)

DEFAULT_TOPOLOGY = Path(__file__).resolve().parents[2] / "containerlab" / "three-node.clab.yml"
PING_COUNT = 3
IPERF_SECONDS = 3
IPERF_PORT = 5201
DEMO_BUDGET = 60.0  # seconds, the whole demo
TUNNEL_WAIT = 5.0  # seconds for tunnel devices to appear after the leases
WARM_UP = 12.0  # seconds for every cross-node pair to answer once before the matrix counts
_DROP_RE = re.compile(r'^udpflannel_drops_total\{reason="([^"]+)"\} (\d+)', re.M)
_TX_RE = re.compile(r"^udpflannel_(tx_packets|tx_superpackets) (\d+)", re.M)


@dataclass
class DemoReport:
    backend: str = ""
    prefix: str = ""  # the lab's namespace prefix, once it exists
    leases: list[tuple[str, str, str, str]] = field(default_factory=list)  # node, subnet, public ip, mtu
    tunnels: dict[str, str | None] = field(default_factory=dict)
    matrix: dict[tuple[str, str], bool] = field(default_factory=dict)
    throughput_bps: float | None = None
    trace_text: str | None = None
    drops: dict[str, dict[str, int]] = field(default_factory=dict)
    # per node: datagrams sent and TUN reads that were TCP superpackets (vxlan / udp agents)
    tx: dict[str, dict[str, int]] = field(default_factory=dict)
    iperf_sender: str = ""  # the node whose pod sent the iperf3 stream
    worked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def backend_in_build(backend: str) -> bool:
    """True if this build ships a module for the backend (then its dataplane is expected to work)."""
    target = REGISTRY.get(backend)
    return target is not None and importlib.util.find_spec(target.partition(":")[0]) is not None


def run_demo(
    topo_path: Path = DEFAULT_TOPOLOGY,
    *,
    root: Path = STATE_ROOT,
    lease_timeout: float = 20.0,
    out: Callable[[str], None] = print,
    agent: Callable | None = None,
) -> DemoReport:
    started = time.monotonic()
    report = DemoReport()
    try:
        topo = topology.load(topo_path)
    except topology.TopologyError as exc:
        report.failed.append(str(exc))
        out(f"demo: {exc}")
        return report
    report.backend = topo.backend
    out(f"== udpflannel lab demo: {topo.name} ({len(topo.agents)} nodes, backend {topo.backend}) ==")
    try:
        labrun = up(topo, root=root, lease_timeout=lease_timeout, agent=agent, log=out)
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        report.failed.append(f"lab up: {exc}")
        out(f"demo: lab up failed, everything it made is removed again: {exc}")
        return report
    report.prefix = labrun.state.prefix
    with labrun:
        check_lab(labrun, report, out, deadline=started + DEMO_BUDGET - 5)
        _summary(report, out)
        out(f"lab {labrun.state.prefix}: taking it down")
    summary = ("FAILED" if report.failed else "OK") + (" (some steps skipped)" if report.skipped else "")
    out(f"demo finished in {time.monotonic() - started:.1f} s: {summary}")
    return report


def check_lab(labrun: LabRun, report: DemoReport, out: Callable[[str], None], deadline: float) -> None:
    """Everything the demo checks on a running lab, recorded in `report` (worked / failed / skipped)."""
    state = labrun.state
    _lease_table(state, report, out)
    if not report.leases:
        return
    # An agent may write subnet.env a moment before its TUN exists: give the devices a bounded moment.
    expect = backend_in_build(state.backend)
    settle = time.monotonic() + (TUNNEL_WAIT if expect else 0)
    # host-gw has no tunnel device: its routes to the other nodes' subnets stand for it.
    carrier = _host_gw_routes if state.backend == "host-gw" else (lambda _state, node: tunnel_device(node.ns))
    while True:
        for node in state.nodes.values():
            report.tunnels[node.name] = carrier(state, node)
        if all(report.tunnels.values()) or time.monotonic() >= settle:
            break
        time.sleep(0.2)
    missing = [n for n, dev in report.tunnels.items() if dev is None]
    if missing:
        what = "routes to every other node's subnet" if state.backend == "host-gw" else "tunnel device"
        why = f"no {what} on {', '.join(missing)}"
        if expect:
            report.failed.append(f"dataplane: {why} although this build has the {state.backend} backend")
        else:
            report.skipped.append(
                f"ping, iperf3, trace: {why} (the {state.backend} dataplane is not in this build)"
            )
        return
    out("")
    label = "host-gw routes" if state.backend == "host-gw" else "tunnel devices"
    out(f"{label}: " + ", ".join(f"{n} {d}" for n, d in report.tunnels.items()))
    _ping_matrix(state, report, out)
    if time.monotonic() + IPERF_SECONDS + 10 < deadline:
        _iperf(state, report, out)
    else:
        report.skipped.append("iperf3: the demo's time budget is used up")
    if time.monotonic() + 8 < deadline:
        _trace(state, report, out)
    else:
        report.skipped.append("trace: the demo's time budget is used up")
    _drops(state, report)


def _host_gw_routes(state: LabState, node: NodeState) -> str | None:
    """host-gw's stand-in for a tunnel device: "via <iface>" once `node` routes every other node's subnet
    via that node's public IP; None before."""
    try:
        routes = run(["ip", "netns", "exec", node.ns, "ip", "route"], timeout=5)
    except (LabError, subprocess.TimeoutExpired):
        return None
    others = [n for n in state.nodes.values() if n is not node]
    if all(f"{n.subnet} via {n.public_ip} dev {node.iface}" in routes for n in others):
        return f"via {node.iface}"
    return None


def _lease_table(state: LabState, report: DemoReport, out: Callable[[str], None]) -> None:
    out("")
    out("cluster subnet table (from the shared lease store):")
    leases = _store_leases(state)
    by_ip = {n.public_ip: n for n in state.nodes.values()}
    out(f"  {'subnet':<18} {'node':<8} {'public ip':<14} {'backend':<10} {'expires in':>10}")
    if not leases:
        out("  (no leases in the store)")
    for subnet, public_ip, backend, expires in leases:
        node = by_ip.get(public_ip)
        out(f"  {subnet:<18} {node.name if node else '?':<8} {public_ip:<14} {backend:<10} {expires:>10}")
    for node in state.nodes.values():
        if node.subnet is None:
            alive = "running" if agent_alive(state, node) else "exited"
            report.failed.append(f"lease: {node.name} got none (agent {alive}; see its log above)")
            continue
        report.leases.append((node.name, node.subnet, node.public_ip, str(node.mtu)))
        pods = ", ".join(f"{p.name} {p.ip}" for p in node.pods) or "no pods"
        out(f"  {node.name}: {node.subnet} (FLANNEL_SUBNET={node.gateway}, MTU {node.mtu}); pods: {pods}")
    if len(report.leases) == len(state.nodes):
        report.worked.append(f"leases: {len(report.leases)}/{len(state.nodes)} nodes hold a subnet")


def _store_leases(state: LabState) -> list[tuple[str, str, str, str]]:
    if not state.db.exists():
        return []
    from udpflannel.lease.sqlite import SqliteStore  # the lab reads the agents' store; only the demo needs it

    store = SqliteStore(state.db)
    try:
        snapshot = store.list()
    finally:
        store.close()
    rows = []
    for lease in sorted(snapshot.leases, key=lambda lease: str(lease.subnet)):
        expires = "never" if lease.expiration is None else f"{lease.expiration - time.time():.0f} s"
        rows.append(
            (str(lease.subnet), str(lease.attrs.public_ip), lease.attrs.backend_type or "udp", expires)
        )
    return rows


def _first_pods(state: LabState) -> list[tuple[NodeState, str, str]]:
    return [(n, n.pods[0].ns, n.pods[0].ip) for n in state.nodes.values() if n.pods]


def _warm_up(pods: list[tuple[NodeState, str, str]]) -> None:
    """Agents learn their peers from the lease store's watch, and WireGuard peers that learn of each other at
    the same moment send crossing initiations, which only settle at the next retransmit (REKEY_TIMEOUT, 5 s,
    as in wireguard-go). Wait (bounded) until every pair has answered once, so the matrix measures the
    dataplane rather than how fast the first peer event or handshake happened."""
    deadline = time.monotonic() + WARM_UP
    pending = [(sns, dip) for s, sns, _ in pods for d, _, dip in pods if s.name != d.name]
    while pending and time.monotonic() < deadline:
        sns, dip = pending[0]
        ping = ["ip", "netns", "exec", sns, "ping", "-n", "-q", "-c", "1", "-W", "1", dip]
        if subprocess.run(ping, capture_output=True, timeout=5).returncode == 0:
            pending.pop(0)


def _ping_matrix(state: LabState, report: DemoReport, out: Callable[[str], None]) -> None:
    pods = _first_pods(state)
    _warm_up(pods)
    procs = {}
    for snode, sns, _ in pods:
        for dnode, _, dip in pods:
            if snode.name != dnode.name:
                ping = ["ping", "-n", "-q", "-c", str(PING_COUNT), "-i", "0.2", "-W", "1", dip]
                procs[(snode.name, dnode.name)] = subprocess.Popen(
                    ["ip", "netns", "exec", sns, *ping], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
    for key, proc in procs.items():
        try:
            report.matrix[key] = proc.wait(timeout=PING_COUNT + 3) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            report.matrix[key] = False
    names = [n.name for n, _, _ in pods]
    out("")
    out("reachability, first pod of each node (rows ping columns):")
    out("  " + " " * 8 + "".join(f"{n:>8}" for n in names))
    for s in names:
        cells = ["-" if s == d else ("ok" if report.matrix[(s, d)] else "FAIL") for d in names]
        out(f"  {s:<8}" + "".join(f"{c:>8}" for c in cells))
    bad = [f"{s}→{d}" for (s, d), ok in report.matrix.items() if not ok]
    if bad:
        report.failed.append(
            f"ping: {len(bad)}/{len(report.matrix)} pod pairs unreachable ({', '.join(bad)})"
        )
    else:
        report.worked.append(f"ping: all {len(report.matrix)} cross-node pod pairs reachable")


def _iperf(state: LabState, report: DemoReport, out: Callable[[str], None]) -> None:
    pods = _first_pods(state)
    if len(pods) < 2:
        report.skipped.append("iperf3: needs pods on two nodes")
        return
    (snode, sns, sip), (dnode, dns, dip) = pods[0], pods[1]
    report.iperf_sender = snode.name
    server = subprocess.Popen(
        ["ip", "netns", "exec", dns, "iperf3", "-s", "-1", "-B", dip, "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(0.3)  # iperf3 binds in a few ms; the client retries nothing, so give it a moment
        cmd = ["iperf3", "-c", dip, "-B", sip, "-p", str(IPERF_PORT), "-t", str(IPERF_SECONDS), "-J"]
        client = subprocess.run(
            ["ip", "netns", "exec", sns, *cmd, "--connect-timeout", "2000"],
            capture_output=True,
            text=True,
            timeout=IPERF_SECONDS + 8,
        )
        result = json.loads(client.stdout or "{}")
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        result = {"error": f"{type(exc).__name__}"}
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=5)
    bps = result.get("end", {}).get("sum_received", {}).get("bits_per_second")
    label = f"iperf3 {snode.name} pod → {dnode.name} pod, {IPERF_SECONDS} s TCP"
    out("")
    if bps:
        report.throughput_bps = float(bps)
        retr = result.get("end", {}).get("sum_sent", {}).get("retransmits", "?")
        out(f"{label}: {bps / 1e6:.1f} Mbit/s (retransmits {retr})")
        report.worked.append(f"iperf3: {bps / 1e6:.1f} Mbit/s pod to pod across nodes")
    else:
        out(f"{label}: failed ({result.get('error', 'no result')})")
        report.failed.append(f"iperf3: {result.get('error', 'no result')}")


def _trace(state: LabState, report: DemoReport, out: Callable[[str], None]) -> None:
    from udpflannel.trace.tracer import trace  # scapy: only when the demo gets this far

    out("")
    try:
        result = trace(state)
    except (ValueError, RuntimeError, subprocess.SubprocessError) as exc:
        report.failed.append(f"trace: {exc}")
        out(f"trace failed: {exc}")
        return
    report.trace_text = result.format()
    out(report.trace_text)
    if result.ok:
        report.worked.append(f"trace: the probe was seen at all {len(result.hops)} hops and answered")
    else:
        report.failed.append(f"trace: seen at {result.seen}/{len(result.hops)} hops, reply {result.replied}")


def fetch_metrics(ns: str, port: int = HEALTHZ_PORT) -> str | None:
    """The agent's /metrics text, fetched on the node namespace's loopback (None if it serves none)."""
    url = f"http://127.0.0.1:{port}/metrics"
    code = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=2).read().decode())"
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True, timeout=5
        )
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout if proc.returncode == 0 else None


def _drops(state: LabState, report: DemoReport) -> None:
    for node in state.nodes.values():
        text = fetch_metrics(node.ns)
        if text is not None:
            report.drops[node.name] = {reason: int(n) for reason, n in _DROP_RE.findall(text)}
            tx = {name: int(n) for name, n in _TX_RE.findall(text)}
            if tx:
                report.tx[node.name] = tx


def _summary(report: DemoReport, out: Callable[[str], None]) -> None:
    out("")
    out("== summary ==")
    for line in report.worked:
        out(f"  worked:  {line}")
    for line in report.failed:
        out(f"  FAILED:  {line}")
    for line in report.skipped:
        out(f"  skipped: {line}")
    if report.drops:
        for node, drops in report.drops.items():
            text = ", ".join(f"{k} {v}" for k, v in sorted(drops.items()) if v) or "none"
            out(f"  drops on {node}: {text}")
        if any(d.get("not_unicast") for d in report.drops.values()):
            # A reader's first question: these are the node's own, not the pods' traffic.
            out("  (not_unicast: multicast the node's kernel sends into the tunnel device, e.g. its IPv6")
            out("   MLD reports; an overlay of node subnets never carries it)")
    elif report.tunnels and all(report.tunnels.values()):
        out("  drops: the agents serve no /metrics (--healthz-port) in this build")
    tx = report.tx.get(report.iperf_sender, {})
    if "tx_superpackets" in tx:  # vxlan / udp agents count them
        # The pods' TCP reaches the TUN as superpackets (up to 64 KiB) unless something cuts them first.
        out(
            f"  sent by {report.iperf_sender}: {tx.get('tx_packets', 0)} datagrams from "
            f"{tx['tx_superpackets']} TCP superpackets read from the TUN"
        )
