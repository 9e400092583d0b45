"""Helpers of the WireGuard interop tests and benchmark: namespaces on one underlay (wire mode), each
running our datapath worker (udpflannel.dataplane.wg_worker) or Debian's wireguard-go set up with wg(8).

Addresses: node i has underlay 198.18.0.i/24 (and fd00:198::i/64) on eth0 and overlay 198.19.i.1/32 and
fd00:198:19:i::1/128 on its WireGuard interface, with 198.19.0.0/16 and fd00:198:19::/48 routed into it; its
peer's allowed IPs are 198.19.j.0/24 and fd00:198:19:j::/64. A v6 lab uses the IPv6 underlay for endpoints.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from udpflannel.codec.wireguard import crypto
from udpflannel.lab.netns import Lab, Netns
from udpflannel.lab.transfer import checked_transfer, read_json_line

REPO = pathlib.Path(__file__).resolve().parents[2]
NETWORK = "198.19.0.0/16"
NETWORK6 = "fd00:198:19::/48"
MTU = 1420
PORT = 51820


def have_wireguard_go() -> bool:
    return shutil.which("wireguard-go") is not None and shutil.which("wg") is not None


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


@dataclass
class WgNode:
    ns: Netns
    index: int
    kind: str  # "ours" or "wggo"
    ifname: str
    private_key: bytes
    tmp: pathlib.Path
    proc: subprocess.Popen | None = None
    peers: list[dict] = field(default_factory=list)
    seq: int = 0

    @property
    def public_key(self) -> bytes:
        return crypto.public_key(self.private_key)

    @property
    def underlay_ip(self) -> str:
        return f"198.18.0.{self.index}"

    @property
    def overlay_ip(self) -> str:
        return f"198.19.{self.index}.1"

    @property
    def subnet(self) -> str:
        return f"198.19.{self.index}.0/24"

    @property
    def underlay_ip6(self) -> str:
        return f"fd00:198::{self.index}"

    @property
    def overlay_ip6(self) -> str:
        return f"fd00:198:19:{self.index}::1"

    @property
    def subnet6(self) -> str:
        return f"fd00:198:19:{self.index}::/64"

    # -- our worker's control channel

    def send(self, obj: dict, expect: str, timeout: float = 10.0) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        self.seq += 1
        self.proc.stdin.write(json.dumps({**obj, "seq": self.seq}) + "\n")
        self.proc.stdin.flush()
        return read_line(self.proc, expect, timeout)

    def stats(self) -> dict:
        """Our worker's stats; for wireguard-go, the per-peer transfer counters from `wg show dump`."""
        if self.kind == "ours":
            return self.send({"op": "stats"}, "stats")["stats"]
        out = self.ns.exec("wg", "show", self.ifname, "dump")
        lines = [line.split("\t") for line in out.strip().splitlines()[1:]]
        return {
            "peers": [
                {
                    "public_key": f[0],
                    "latest_handshake": int(f[4]),
                    "rx_bytes": int(f[5]),
                    "tx_bytes": int(f[6]),
                }
                for f in lines
            ]
        }

    def handshake_time(self) -> float:
        peers = self.stats()["peers"]
        return max((p["latest_handshake"] or 0) for p in peers) if peers else 0


def read_line(proc: subprocess.Popen, key: str, timeout: float) -> dict:
    return read_json_line(proc, key, timeout, "wg worker")


class WgLab:
    """Two or more WireGuard nodes on one underlay; close() removes every namespace, process and file."""

    def __init__(self, v6_underlay: bool = False) -> None:
        self.v6_underlay = v6_underlay
        self.lab = Lab()
        self._tmp = tempfile.TemporaryDirectory(prefix="udpflannel-wg-")
        self.tmp = pathlib.Path(self._tmp.name)
        self.nodes: list[WgNode] = []
        self.hub: Netns | None = None

    def __enter__(self) -> WgLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes:
            self.stop(node)
        self.lab.close()
        self._tmp.cleanup()

    def _hub(self) -> Netns:
        if self.hub is None:
            self.hub = self.lab.switch("hub")
        return self.hub

    def node(self, index: int, kind: str, *, timing: dict | None = None, offload: bool = True) -> WgNode:
        hub = self._hub()
        ns = self.lab.netns(f"w{index}")
        self.lab.plug(ns, hub, f"198.18.0.{index}/24", f"p{index}")
        ns.exec("ip", "addr", "add", f"fd00:198::{index}/64", "dev", "eth0", "nodad")
        key = crypto.generate_private_key(os.urandom(32))
        ifname = f"{self.lab.prefix}wg{index}"
        tmp = self.tmp / f"n{index}"
        tmp.mkdir()
        node = WgNode(ns, index, kind, ifname, key, tmp)
        if kind == "ours":
            cmd = [sys.executable, "-m", "udpflannel.dataplane.wg_worker", "--tun", ifname]
            cmd += ["--port", str(PORT), "--mtu", str(MTU), "--bind", "::" if self.v6_underlay else "0.0.0.0"]
            if not offload:
                cmd.append("--no-offload")
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            node.proc = subprocess.Popen(
                ns.cmd(*cmd),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                start_new_session=True,
            )
            node.proc.stdin.write(json.dumps({"op": "key", "private_key": b64(key), "timing": timing}) + "\n")
            node.proc.stdin.flush()
            read_line(node.proc, "ready", 20)
        else:
            node.proc = ns.popen("wireguard-go", "-f", ifname, stdout=subprocess.DEVNULL)
            sock = pathlib.Path("/var/run/wireguard") / f"{ifname}.sock"
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            keyfile = tmp / "key"
            keyfile.write_text(b64(key) + "\n")
            keyfile.chmod(0o400)
            ns.exec("wg", "set", ifname, "private-key", str(keyfile), "listen-port", str(PORT))
        ns.exec("ip", "link", "set", ifname, "mtu", str(MTU), "up")
        ns.exec("ip", "addr", "add", f"{node.overlay_ip}/32", "dev", ifname)
        ns.exec("ip", "route", "add", NETWORK, "dev", ifname)
        ns.exec("ip", "addr", "add", f"{node.overlay_ip6}/128", "dev", ifname, "nodad")
        ns.exec("ip", "route", "add", NETWORK6, "dev", ifname)
        self.nodes.append(node)
        return node

    def connect(self, a: WgNode, b: WgNode, *, psk: bytes | None = None, keepalive: int = 0) -> None:
        """Tell a about b: public key, endpoint, allowed IPs (b's subnet)."""
        host = b.underlay_ip6 if self.v6_underlay else b.underlay_ip
        if a.kind == "ours":
            a.peers = [p for p in a.peers if p["public_key"] != b64(b.public_key)]
            a.peers.append(
                {
                    "public_key": b64(b.public_key),
                    "endpoint": [host, PORT],
                    "allowed_ips": [b.subnet, b.subnet6],
                    "psk": b64(psk) if psk else None,
                    "keepalive": keepalive,
                }
            )
            a.send({"op": "peers", "peers": a.peers}, "applied")
            return
        endpoint = f"[{host}]:{PORT}" if self.v6_underlay else f"{host}:{PORT}"
        cmd = ["wg", "set", a.ifname, "peer", b64(b.public_key), "endpoint", endpoint]
        cmd += ["allowed-ips", f"{b.subnet},{b.subnet6}"]
        if psk:
            pskfile = a.tmp / "psk"
            pskfile.write_text(b64(psk) + "\n")
            cmd += ["preshared-key", str(pskfile)]
        if keepalive:
            cmd += ["persistent-keepalive", str(keepalive)]
        a.ns.exec(*cmd)

    def stop(self, node: WgNode) -> None:
        proc = node.proc
        node.proc = None
        if proc is None or proc.poll() is not None:
            return
        if node.kind == "ours" and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait(timeout=5)


def ping(
    src: WgNode,
    dst: WgNode,
    count: int = 3,
    size: int = 56,
    wait: float = 3,
    timeout: float = 30,
    v6: bool = False,
) -> None:
    """ping must get every reply (-W: seconds to wait for each); v6 pings the inner IPv6 address."""
    target = dst.overlay_ip6 if v6 else dst.overlay_ip
    src.ns.exec(
        "ping", "-c", str(count), "-i", "0.2", "-W", str(wait), "-s", str(size), target, timeout=timeout
    )


def transfer(src: WgNode, dst: WgNode, nbytes: int, port: int = 7000, timeout: float = 120) -> float:
    """nbytes over TCP from src to dst's overlay address; length and sha256 must match at both ends."""
    return checked_transfer(src.ns, dst.ns, dst.overlay_ip, nbytes, port, timeout)
