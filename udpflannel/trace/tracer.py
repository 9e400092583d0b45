"""Follows one ICMP echo request from a pod to a pod on another node, hop by hop, through a running lab.

Hops, as flannel's CNI and our agent lay them out: source pod eth0 → source node cni0 → source node tunnel
device (TUN) → source node underlay → destination node underlay → destination tunnel device → destination cni0
→ destination pod eth0. tcpdump captures every hop into `<lab dir>/trace/`; the probe carries a random
payload pattern so the same packet is recognised at every hop where it is visible in clear.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from udpflannel.codec.wireguard.messages import MESSAGE_TRANSPORT_TYPE, PADDING_MULTIPLE, TRANSPORT_OVERHEAD
from udpflannel.lab.runtime import CNI_BRIDGE, POD_IFACE, LabState, NodeState, PodState, tunnel_link
from udpflannel.trace.capture import Capture, CaptureSet, Frame
from udpflannel.trace.dissect import Dissection, dissect, encap_ports

PING_TIMEOUT = 3  # seconds ping waits for the reply
PROBE_PAYLOAD = 56  # ping's default data size: the probe is a 84-byte IPv4 packet
PROBE_IP_LEN = 20 + 8 + PROBE_PAYLOAD
# WireGuard pads the plaintext to 16 bytes and adds header and tag: the size the encrypted probe must have.
WG_PROBE_LEN = TRANSPORT_OVERHEAD + -(-PROBE_IP_LEN // PADDING_MULTIPLE) * PADDING_MULTIPLE
SETTLE = 0.3  # after the reply, let the last hops' tcpdumps write


@dataclass(frozen=True, slots=True)
class Hop:
    where: str  # e.g. "node1 eth1"
    ns: str
    iface: str
    bpf: str
    explain: str


@dataclass(frozen=True, slots=True)
class HopResult:
    hop: Hop
    pcap: Path
    frame: Frame | None
    dissection: Dissection | None
    others: list[str]  # one-line summaries of other tunnel frames seen in the window (e.g. a handshake)
    error: str | None = None  # the capture itself failed on this hop


@dataclass(frozen=True, slots=True)
class TraceResult:
    src: str
    dst: str
    backend: str
    hops: list[HopResult]
    replied: bool
    ping_output: str

    @property
    def seen(self) -> int:
        return sum(1 for h in self.hops if h.frame is not None)

    @property
    def ok(self) -> bool:
        return self.replied and self.seen == len(self.hops)

    def format(self) -> str:
        lines = [f"trace: one ICMP echo request {self.src} → {self.dst} (backend {self.backend})", ""]
        start = next((h.frame.time for h in self.hops if h.frame is not None), None)
        for i, h in enumerate(self.hops, 1):
            if h.error is not None:
                lines.append(f"hop {i}  {h.hop.where}: NOT CAPTURED ({h.error})")
                lines.append("")
                continue
            if h.frame is None or h.dissection is None:
                lines.append(f"hop {i}  {h.hop.where}: NOT SEEN   ({h.hop.explain})")
                lines.append("")
                continue
            dt = (h.frame.time - start) * 1e3 if start is not None else 0.0
            lines.append(f"hop {i}  {h.hop.where}   +{dt:.3f} ms   {h.dissection.length} bytes on the wire")
            lines.append(f"  {h.hop.explain}")
            lines.append(h.dissection.format("    "))
            for other in h.others:
                lines.append(f"    (also in this capture: {other})")
            lines.append("")
        ttls = [(h.hop.where, _inner_ttl(h.dissection)) for h in self.hops if h.dissection is not None]
        ttl_text = " → ".join(f"{ttl} at {where}" for where, ttl in ttls if ttl is not None)
        if ttl_text:
            tunnelled = any(h.dissection is not None and h.dissection.encapsulation for h in self.hops)
            label = "inner TTL" if tunnelled else "TTL"  # (host-gw, DirectRouting: nothing is inside)
            lines.append(f"{label}: {ttl_text} (each node that routes the packet takes one)")
        reply = "received" if self.replied else "NOT received"
        lines.append(f"seen at {self.seen}/{len(self.hops)} hops; echo reply {reply}")
        return "\n".join(lines)


def _inner_ttl(d: Dissection | None) -> int | None:
    if d is None:
        return None
    depth = 1 if d.encapsulation in ("vxlan", "udp") else 0
    layer = d.find("IPv4", depth)
    if d.encapsulation == "wireguard" or layer is None:
        return None
    return int(layer.fields["ttl"])


def plan_hops(state: LabState, src: tuple[NodeState, PodState], dst: tuple[NodeState, PodState]) -> list[Hop]:
    (snode, spod), (dnode, dpod) = src, dst
    backend = state.backend
    # host-gw, or vxlan's DirectRouting to a peer on the link: the pod's packet leaves by the underlay itself.
    direct = backend == "host-gw" or _leaves_by(snode, dpod.ip) == snode.iface
    hops = [
        Hop(
            f"{spod.name} {POD_IFACE}",
            spod.ns,
            POD_IFACE,
            "icmp",
            f"the pod sends the request to its default gateway {snode.gateway} (cni0 on {snode.name})",
        ),
        Hop(
            f"{snode.name} {CNI_BRIDGE}",
            snode.ns,
            CNI_BRIDGE,
            "icmp",
            f"{snode.name} receives it on its bridge and routes {dpod.ip}: not local, so "
            + (f"the route via {dnode.public_ip}" if direct else "the cluster route"),
        ),
    ]
    if direct:
        return [*hops, *_direct_underlay(snode, dnode, dpod, backend), *_delivery(dnode, dpod)]
    stun, skind = tunnel_link(snode.ns) or (None, None)
    sactor = "udpflannel" if skind in (None, "tun") else f"the kernel's {skind} device"
    if stun is not None:
        explain = f"the route points into {stun}: " + (
            "udpflannel reads this bare IP packet from the TUN" if skind == "tun" else f"{sactor} takes it"
        )
        hops.append(Hop(f"{snode.name} {stun}", snode.ns, stun, "icmp", explain))
    dtun, dkind = tunnel_link(dnode.ns) or (None, None)
    dactor = "udpflannel" if dkind in (None, "tun") else f"the kernel's {dkind} device"
    outer = f"outer {snode.public_ip} → {dnode.public_ip}"
    hops += _tunnel_underlay(snode, dnode, sactor, dactor, dkind, dtun, outer, backend)
    if dtun is not None:
        explain = (
            f"{dactor} took the encapsulation off; the inner packet leaves {dtun} into {dnode.name}'s stack"
        )
        hops.append(Hop(f"{dnode.name} {dtun}", dnode.ns, dtun, "icmp", explain))
    return hops + _delivery(dnode, dpod)


def _delivery(dnode: NodeState, dpod: PodState) -> list[Hop]:
    """The last two hops: the destination node's bridge and the pod."""
    return [
        Hop(
            f"{dnode.name} {CNI_BRIDGE}",
            dnode.ns,
            CNI_BRIDGE,
            "icmp",
            f"{dnode.name} routes {dpod.ip} to its own subnet on cni0, Ethernet to the pod's MAC",
        ),
        Hop(
            f"{dpod.name} {POD_IFACE}",
            dpod.ns,
            POD_IFACE,
            "icmp",
            "delivered: the pod answers with an echo reply that travels back the same way",
        ),
    ]


def _leaves_by(node: NodeState, ip: str) -> str | None:
    """The device a packet from `node` to `ip` leaves by (`ip route get`); None if there is no route."""
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", node.ns, "ip", "-j", "route", "get", ip],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        return json.loads(out)[0].get("dev")
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError, KeyError, AttributeError):
        return None


def _tunnel_underlay(
    snode: NodeState,
    dnode: NodeState,
    sactor: str,
    dactor: str,
    dkind: str | None,
    dtun: str | None,
    outer: str,
    backend: str,
) -> list[Hop]:
    """An encapsulating backend's two underlay hops: the datagram leaves one node, arrives at the other."""
    return [
        Hop(
            f"{snode.name} {snode.iface}",
            snode.ns,
            snode.iface,
            "udp",
            f"{sactor} wrapped it for {dnode.name} ({backend}): {outer}"
            # spec/flannel.md: flannel's udp proxy routes like a hop, so it decrements the inner TTL too.
            + ("; like flannel's udp proxy it also takes one from the inner TTL" if backend == "udp" else ""),
        ),
        Hop(
            f"{dnode.name} {dnode.iface}",
            dnode.ns,
            dnode.iface,
            "udp",
            f"the same datagram arrives at {dnode.name}; its kernel hands it to "
            + ("udpflannel's UDP socket" if dactor == "udpflannel" else f"its {dkind} device {dtun}"),
        ),
    ]


def _direct_underlay(snode: NodeState, dnode: NodeState, dpod: PodState, backend: str) -> list[Hop]:
    """host-gw and DirectRouting: the pod's packet itself crosses the underlay, routed by the kernel."""
    why = "host-gw" if backend == "host-gw" else f"{backend} DirectRouting: {dnode.name} is on the link"
    return [
        Hop(
            f"{snode.name} {snode.iface}",
            snode.ns,
            snode.iface,
            "icmp",
            f"the route udpflannel set ({dnode.subnet} via {dnode.public_ip}; {why}) sends the packet as"
            f" it is, in an Ethernet frame to {dnode.name}: no encapsulation",
        ),
        Hop(
            f"{dnode.name} {dnode.iface}",
            dnode.ns,
            dnode.iface,
            "icmp",
            f"{dnode.name}'s kernel receives it for {dpod.ip} and routes it on, as any router would",
        ),
    ]


def pick_pods(state: LabState, src: str | None, dst: str | None) -> tuple[tuple[NodeState, PodState], ...]:
    """Resolve pod names (default: the first pod of the first node, and the first pod on another node)."""
    pods = state.pods()
    if not pods:
        raise ValueError("the lab has no pods (did the agents get their leases?)")
    by_name = {p.name: (n, p) for n, p in pods}
    if src is not None and src not in by_name:
        raise ValueError(f"no pod {src!r}; pods: {', '.join(by_name)}")
    if dst is not None and dst not in by_name:
        raise ValueError(f"no pod {dst!r}; pods: {', '.join(by_name)}")
    s = by_name[src] if src else pods[0]
    if dst:
        d = by_name[dst]
    else:
        others = [(n, p) for n, p in pods if n.name != s[0].name]
        if not others:
            raise ValueError("the lab has pods on one node only: nothing crosses the tunnel")
        d = others[0]
    if s[0].name == d[0].name:
        raise ValueError(f"{s[1].name} and {d[1].name} are on the same node: pick pods on two nodes")
    return s, d


def trace(state: LabState, src: str | None = None, dst: str | None = None) -> TraceResult:
    """Send one echo request between two pods on different nodes and dissect it at every hop."""
    s, d = pick_pods(state, src, dst)
    hops = plan_hops(state, s, d)
    run_dir = Path(state.dir) / "trace" / time.strftime("%H%M%S")
    captures = [
        Capture(h.ns, h.iface, run_dir / f"{i:02d}-{h.where.replace(' ', '-')}.pcap", h.bpf)
        for i, h in enumerate(hops, 1)
    ]
    pattern = secrets.token_bytes(8)
    with CaptureSet(captures):
        # -p fills the payload with our pattern: the mark that finds this very packet at every clear hop.
        ping_cmd = [
            "ping",
            "-n",
            "-c",
            "1",
            "-s",
            str(PROBE_PAYLOAD),
            "-W",
            str(PING_TIMEOUT),
            "-p",
            pattern.hex(),
        ]
        ping_cmd.append(d[1].ip)
        ping = subprocess.run(
            ["ip", "netns", "exec", s[1].ns, *ping_cmd],
            capture_output=True,
            text=True,
            timeout=PING_TIMEOUT + 5,
        )
        time.sleep(SETTLE)
    ports = encap_ports({"Type": state.backend}) if state.backend else encap_ports()
    results = [_match(h, c, pattern, ports, s[0], d[0]) for h, c in zip(hops, captures, strict=True)]
    return TraceResult(
        src=f"{s[1].name} ({s[1].ip})",
        dst=f"{d[1].name} ({d[1].ip})",
        backend=state.backend,
        hops=results,
        replied=ping.returncode == 0,
        ping_output=(ping.stdout + ping.stderr).strip(),
    )


def _match(hop: Hop, cap: Capture, pattern: bytes, ports, snode: NodeState, dnode: NodeState) -> HopResult:
    """Our probe in this hop's capture: the frame carrying the pattern, or for an encrypted tunnel the first
    transport message from the source node to the destination node whose size fits the probe exactly."""
    if cap.error is not None:
        return HopResult(hop, cap.pcap, None, None, [], cap.error)
    frames = cap.frames()
    dissections = [dissect(f.data, f.linktype, ports) for f in frames]
    for f, dis in zip(frames, dissections, strict=True):
        if pattern in f.data:
            return HopResult(hop, cap.pcap, f, dis, [])
    chosen: tuple[Frame, Dissection] | None = None
    others = []
    for f, dis in zip(frames, dissections, strict=True):
        ip = dis.find("IPv4", 0)
        wg = dis.find("WireGuard")
        if dis.encapsulation != "wireguard" or ip is None or wg is None:
            continue
        forward = ip.fields["src"] == snode.public_ip and ip.fields["dst"] == dnode.public_ip
        if (
            chosen is None
            and forward
            and wg.fields["type"] == MESSAGE_TRANSPORT_TYPE
            and wg.fields["length"] == WG_PROBE_LEN
        ):
            chosen = (f, dis)
        elif chosen is None:
            others.append(f"{ip.fields['src']} → {ip.fields['dst']} WireGuard {wg.summary}")
    if chosen is not None:
        return HopResult(hop, cap.pcap, chosen[0], chosen[1], others)
    return HopResult(hop, cap.pcap, None, None, others)
