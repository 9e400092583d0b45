"""Tracing an encrypted tunnel: a lab whose nodes run WireGuard (the kernel's, or wireguard-go where the
kernel has none) configured like flannel's wireguard backend. The probe is invisible inside the ciphertext,
so the trace must pick it by direction and exact size, and show the handshake the first packet triggered.
Root only."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_agent import fake_agent_with

from udpflannel.lab import topology
from udpflannel.lab.netns import leftover_namespaces
from udpflannel.lab.runtime import LabRun, up
from udpflannel.trace.tracer import WG_PROBE_LEN, trace

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")

REPO = Path(__file__).resolve().parents[2]
WG_TOPOLOGY = REPO / "containerlab" / "three-node-wireguard.clab.yml"
WG_PORT = 51820  # flannel's wireguard ListenPort default, as in the topology's net-conf


def wg_dev(labrun: LabRun, node: str) -> str:
    """A name unique on the host: wireguard-go's control socket /var/run/wireguard/<dev>.sock is not per
    namespace, so three nodes with one device name would steer each other's devices."""
    return f"{labrun.state.prefix}wg{node[-1]}"


def _wg_device(labrun: LabRun, name: str) -> None:
    """The kernel's WireGuard if it has one, else wireguard-go (a TUN, like our agent's)."""
    ns, dev = labrun.lab.namespaces[name], wg_dev(labrun, name)
    ns.exec("ip", "link", "add", dev, "type", "wireguard", check=False)
    if dev in ns.exec("ip", "-o", "link", "show"):
        return
    env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    ns.popen("wireguard-go", "-f", dev, env=env)  # stopped with the lab (Lab.close)
    deadline = time.monotonic() + 5
    while dev not in ns.exec("ip", "-o", "link", "show"):
        assert time.monotonic() < deadline, f"wireguard-go did not create {dev}"
        time.sleep(0.05)


def wireguard_mesh(labrun: LabRun) -> None:
    nodes = list(labrun.state.nodes.values())
    keys = {}
    for node in nodes:
        private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
        public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True)
        keyfile = labrun.state.node_dir(node.name) / "wgkey"
        keyfile.write_text(private + "\n")
        keyfile.chmod(0o400)
        keys[node.name] = (keyfile, public.stdout.strip())
        _wg_device(labrun, node.name)
    for node in nodes:
        ns, dev = labrun.lab.namespaces[node.name], wg_dev(labrun, node.name)
        ns.exec("wg", "set", dev, "private-key", str(keys[node.name][0]), "listen-port", str(WG_PORT))
        ns.exec("ip", "link", "set", dev, "mtu", "1420", "up")
        ns.exec("ip", "addr", "add", node.subnet.replace("/24", "/32"), "dev", dev)
        for peer in nodes:
            if peer is not node:
                endpoint = f"{peer.public_ip}:{WG_PORT}"
                peer_key = keys[peer.name][1]
                ns.exec("wg", "set", dev, "peer", peer_key, "endpoint", endpoint, "allowed-ips", peer.subnet)
                ns.exec("ip", "route", "add", peer.subnet, "dev", dev)


@pytest.fixture(scope="module")
def wg_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabRun]:
    root = tmp_path_factory.mktemp("wglabs")
    labrun = up(topology.load(WG_TOPOLOGY), root=root, agent=fake_agent_with(mtu=1420), log=lambda _: None)
    try:
        wireguard_mesh(labrun)
        yield labrun
    finally:
        labrun.close()
        assert leftover_namespaces(labrun.state.prefix) == []
        assert not list(Path("/var/run/wireguard").glob(f"{labrun.state.prefix}wg*"))


def test_trace_through_wireguard_finds_the_encrypted_probe(wg_lab: LabRun) -> None:
    result = trace(wg_lab.state, "node1-p0", "node2-p1")
    text = result.format()
    assert result.ok and result.seen == 8, text
    for hop in result.hops[3:5]:  # node1 eth1, node2 eth1
        d = hop.dissection
        assert d is not None and d.encapsulation == "wireguard"
        outer = d.find("IPv4", 0).fields
        assert (outer["src"], outer["dst"]) == ("198.18.0.1", "198.18.0.2")
        assert d.find("UDP", 0).fields["dport"] == WG_PORT
        wg = d.find("WireGuard").fields
        assert wg["type_name"] == "transport data" and wg["length"] == WG_PROBE_LEN
        assert wg["counter"] >= 0 and "receiver_index" in wg
        assert d.find("ICMP") is None  # encrypted: nothing inside is readable
    # Nothing had crossed before: the probe triggered the handshake, which the trace lists beside it.
    handshake = "\n".join(result.hops[3].others)
    assert "handshake initiation" in handshake and "handshake response" in handshake
    assert "(also in this capture: 198.18.0.1 → 198.18.0.2 WireGuard handshake initiation" in text
    # The same transport message leaves node1 and arrives at node2.
    sent, received = (h.dissection.find("WireGuard").fields for h in result.hops[3:5])
    assert (sent["receiver_index"], sent["counter"]) == (received["receiver_index"], received["counter"])
    inner = result.hops[5].dissection.find("IPv4", 0).fields
    assert (inner["src"], inner["dst"]) == ("198.19.1.2", "198.19.2.3")


def test_second_trace_reuses_the_session(wg_lab: LabRun) -> None:
    first = trace(wg_lab.state, "node3-p0", "node1-p0")
    second = trace(wg_lab.state, "node3-p0", "node1-p0")
    assert first.ok and second.ok, second.format()
    assert second.hops[3].others == []  # no new handshake within the session's lifetime
    c1 = first.hops[3].dissection.find("WireGuard").fields["counter"]
    c2 = second.hops[3].dissection.find("WireGuard").fields["counter"]
    assert c2 > c1
