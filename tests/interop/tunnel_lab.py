"""Shared helpers of the vxlan/udp interop tests: namespaces as nodes, our dataplane runner per node, a
kernel VXLAN node configured exactly as flanneld configures flannel.1, and a sha256-checked TCP transfer."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import tempfile
from dataclasses import dataclass, field

from udpflannel.lab import kernel_vxlan
from udpflannel.lab.netns import Lab, Netns
from udpflannel.lab.runner import runner_command, start_runner
from udpflannel.lab.transfer import checked_transfer, read_json_line

NETWORK = "198.19.0.0/16"
NETWORK6 = "fd00:198:19::/48"
VNI = 1
# Linux 6.17 gave TAP devices UDP-tunnel GSO: there the datapath sends superpackets through its tunnel TAP.
KERNEL_TUNNEL_TAP = tuple(map(int, os.uname().release.split(".")[:2])) >= (6, 17)


@dataclass
class Node:
    ns: Netns
    index: int
    kind: str  # "vxlan", "udp" or "kernel"
    state_dir: pathlib.Path
    proc: subprocess.Popen | None = None
    mac: str = ""
    pids: list[int] = field(default_factory=list)
    offloads: dict[str, list[str]] = field(default_factory=dict)
    v6_underlay: bool = False
    mac6: str = ""  # kernel nodes: flannel-v6.1's MAC (udpflannel uses one MAC for both families)

    @property
    def public_ip(self) -> str:
        return f"198.18.0.{self.index}"

    @property
    def subnet(self) -> str:
        return f"198.19.{self.index}.0/24"

    @property
    def tun_ip(self) -> str:
        return f"198.19.{self.index}.0"

    @property
    def subnet6(self) -> str:
        return f"fd00:198:19:{self.index}::/64"

    @property
    def tun_ip6(self) -> str:
        return f"fd00:198:19:{self.index}::"

    def lease_json(self, dual: bool = False) -> dict:
        btype = "" if self.kind == "udp" else "vxlan"
        data = {"VNI": VNI, "VtepMAC": self.mac} if btype else None
        out = {
            "subnet": self.subnet,
            "public_ip": self.public_ip,
            "backend_type": btype,
            "backend_data": data,
        }
        if dual:
            out["subnet6"] = self.subnet6
            out["backend_v6_data"] = {"VNI": VNI, "VtepMAC": self.mac6 or self.mac} if btype else None
            if self.v6_underlay:
                out["public_ipv6"] = self.public_ipv6
        return out

    @property
    def public_ipv6(self) -> str:
        return f"fd00:198::{self.index}"

    def send(self, obj: dict, expect: str, timeout: float = 10.0) -> dict:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()
        return _read_line(self.proc, expect, timeout)

    def stats(self) -> dict[str, int]:
        return self.send({"op": "stats"}, "stats")["stats"]


def _read_line(proc: subprocess.Popen, key: str, timeout: float) -> dict:
    return read_json_line(proc, key, timeout, "dataplane runner")


class TunnelLab:
    """A hub namespace (bridge of the underlay) and nodes hanging off it; close() removes everything."""

    def __init__(self) -> None:
        self.lab = Lab()
        self.tmp = tempfile.TemporaryDirectory(prefix="udpflannel-interop-")
        self.nodes: dict[int, Node] = {}
        self.hub: Netns | None = None

    def __enter__(self) -> TunnelLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes.values():
            self.stop_node(node)
        self.lab.close()
        self.tmp.cleanup()

    def _hub(self) -> Netns:
        if self.hub is None:
            self.hub = self.lab.switch("hub")
        return self.hub

    def node(
        self,
        index: int,
        kind: str,
        env: dict[str, str] | None = None,
        dual: bool = False,
        v6_underlay: bool = False,
    ) -> Node:
        """A node namespace with eth0 = 198.18.0.<index>/16 on the shared underlay, running `kind`."""
        hub = self._hub()
        ns = self.lab.netns(f"n{index}")
        self.lab.plug(ns, hub, f"198.18.0.{index}/16", f"p{index}")
        state = pathlib.Path(self.tmp.name) / f"n{index}"
        state.mkdir()
        node = Node(ns, index, kind, state, v6_underlay=v6_underlay)
        if v6_underlay:
            ns.exec("ip", "-6", "addr", "add", f"{node.public_ipv6}/64", "dev", "eth0", "nodad")
        if kind == "kernel" and v6_underlay:
            # flanneld's dual-stack vxlan: a second device, flannel-v6.1, over the IPv6 underlay.
            node.mac6 = f"02:5a:00:00:06:{index:02x}"
            kernel_vxlan.add_device(
                ns,
                mac=node.mac6,
                local=node.public_ipv6,
                address=f"{node.tun_ip6}/128",
                name=kernel_vxlan.DEVICE_V6,
                mtu=1430,
            )
        if kind == "kernel":
            node.mac = f"02:5a:00:00:00:{index:02x}"
            kernel_vxlan.add_device(ns, mac=node.mac, local=node.public_ip, address=f"{node.tun_ip}/32")
        else:
            cmd = runner_command(
                kind,
                network=NETWORK,
                subnet=node.subnet,
                subnet_file=state / "subnet.env",
                network6=NETWORK6 if dual else None,
                subnet6=node.subnet6 if dual else None,
            )
            node.proc, ready = start_runner(ns, cmd, env, start_new_session=True)
            attrs = ready["attrs"]
            node.pids = ready["pids"]
            node.offloads = ready.get("offloads", {})
            if kind == "vxlan":
                node.mac = attrs["BackendData"]["VtepMAC"]
        self.nodes[index] = node
        return node

    def stop_node(self, node: Node) -> None:
        if node.proc is not None and node.proc.poll() is None:
            with contextlib.suppress(OSError):
                node.proc.stdin.close()  # type: ignore[union-attr]
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=5)
        node.proc = None

    def connect(self, a: Node, b: Node, dual: bool = False) -> None:
        """Tell a about b (a lease event, or flanneld's route + neighbour + fdb for a kernel node)."""
        if a.kind == "kernel" and dual:
            kernel_vxlan.add_peer(
                a.ns,
                subnet=b.subnet6,
                vtep=b.tun_ip6,
                mac=b.mac6 or b.mac,
                public_ip=b.public_ipv6,
                name=kernel_vxlan.DEVICE_V6,
            )
        if a.kind == "kernel":
            kernel_vxlan.add_peer(a.ns, subnet=b.subnet, vtep=b.tun_ip, mac=b.mac, public_ip=b.public_ip)
        else:
            a.send({"op": "add", **b.lease_json(dual)}, "applied")

    def disconnect(self, a: Node, b: Node) -> None:
        if a.kind == "kernel":
            kernel_vxlan.remove_peer(a.ns, subnet=b.subnet, vtep=b.tun_ip, mac=b.mac, public_ip=b.public_ip)
        else:
            a.send({"op": "remove", **b.lease_json()}, "applied")


def transfer(src: Node, dst: Node, nbytes: int, dst_ip: str, port: int = 7000, timeout: float = 60) -> float:
    """Send nbytes over TCP from src's node namespace to dst_ip in dst's, sha256-checked at both ends."""
    return checked_transfer(src.ns, dst.ns, dst_ip, nbytes, port, timeout)


def ping(src: Node, dst_ip: str, count: int = 3, size: int = 56) -> None:
    src.ns.exec("ping", "-c", str(count), "-i", "0.2", "-W", "2", "-s", str(size), dst_ip, timeout=30)
