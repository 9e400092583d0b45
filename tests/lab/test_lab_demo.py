"""`udpflannel lab demo` end to end with the real `udpflannel run` agents: bounded in time, honest about what
failed, and nothing left behind afterwards. Root only."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from udpflannel.lab.demo import DEFAULT_TOPOLOGY, backend_in_build, run_demo
from udpflannel.lab.netns import leftover_namespaces
from udpflannel.lab.runtime import find_labs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")

needs_agent = pytest.mark.skipif(
    importlib.util.find_spec("udpflannel.agent") is None,
    reason="the node agent (udpflannel.agent, `udpflannel run`) is not in this build yet",
)
DEMO_LIMIT = 90.0


def lab_namespaces() -> set[str]:
    """Namespaces that look like a lab's (`<prefix>-node1`...): other tests may run alongside with theirs."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    return {n for n in names if n.partition("-")[2].startswith(("node", "br-underlay"))}


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def assert_nothing_left(prefix: str, root: Path) -> None:
    assert prefix and leftover_namespaces(prefix) == []
    assert processes_mentioning(str(root)) == []
    assert find_labs(root) == []


def test_demo_reports_agents_that_cannot_start_and_cleans_up(tmp_path: Path) -> None:
    # A flag `udpflannel run` rejects: every agent exits at once, and the demo must say so and fail.
    topo = tmp_path / "bad-agent.clab.yml"
    topo.write_text(
        DEFAULT_TOPOLOGY.read_text().replace(
            'udpflannel.pods: "2"', 'udpflannel.pods: "2"\n      udpflannel.args: --no-such-flag'
        )
    )
    lines: list[str] = []
    started = time.monotonic()
    report = run_demo(topo, root=tmp_path / "labs", lease_timeout=10, out=lines.append)
    text = "\n".join(lines)
    assert time.monotonic() - started < 30
    assert report.exit_code == 1
    assert len([f for f in report.failed if f.startswith("lease:")]) == 3, text
    assert "no-such-flag" in text  # the agent's own complaint reaches the user
    assert "demo finished" in text and "FAILED" in text
    assert_nothing_left(report.prefix, tmp_path / "labs")


@needs_agent
@pytest.mark.parametrize(
    "topology",
    ["three-node", "three-node-udp", "three-node-wireguard", "three-node-host-gw", "three-node-direct"],
)
def test_demo_end_to_end_with_real_agents(tmp_path: Path, topology: str) -> None:
    lines: list[str] = []
    started = time.monotonic()
    report = run_demo(DEFAULT_TOPOLOGY.with_name(f"{topology}.clab.yml"), root=tmp_path, out=lines.append)
    elapsed = time.monotonic() - started
    text = "\n".join(lines)
    print(text)
    assert elapsed < DEMO_LIMIT, text
    assert_nothing_left(report.prefix, tmp_path)
    # Leases come from the real agents through the shared SQLite store.
    assert len(report.leases) == 3, text
    subnets = {subnet for _, subnet, _, _ in report.leases}
    assert len(subnets) == 3 and all(s.startswith("198.19.") for s in subnets)
    if backend_in_build(report.backend):
        assert report.failed == [], text
        assert len(report.matrix) == 6 and all(report.matrix.values())
        assert report.throughput_bps is not None and report.throughput_bps > 0
        routed = topology in ("three-node-host-gw", "three-node-direct")  # no tunnel between the pods
        hops = 6 if routed else 8
        assert report.trace_text is not None
        assert f"seen at {hops}/{hops} hops; echo reply received" in report.trace_text
        if routed:
            # Routes, not a tunnel: the pod's own packet crosses the underlay, one TTL less per node.
            if topology == "three-node-host-gw":
                assert report.tunnels == {n: "via eth1" for n in ("node1", "node2", "node3")}
            else:  # DirectRouting keeps the TUN for peers behind a router
                assert report.tunnels == {n: "flannel.1" for n in ("node1", "node2", "node3")}
                assert "vxlan DirectRouting: node2 is on the link" in report.trace_text
            assert "no encapsulation" in report.trace_text and "VXLAN" not in report.trace_text
            assert "\nTTL: 64 at node1-p0 eth0" in report.trace_text
            return
        if topology != "three-node-wireguard":
            # Pod TCP comes to the TUN as superpackets (~45 datagrams each); a TUN gso_max_size below the
            # pods' 64 KiB made the kernel cut them all into single packets first (a datagram per read).
            tx = report.tx[report.iperf_sender]
            assert tx["tx_packets"] <= 100 * max(tx["tx_superpackets"], 1), (tx, text)
        encap = {"three-node": "VXLAN      flags 0x08  vni 1", "three-node-udp": "(udp tunnel)"}
        wg = "WireGuard  transport data  receiver index 0x"
        assert encap.get(topology, wg) in report.trace_text
    assert report.exit_code == (1 if report.failed else 0)


@needs_agent
def test_cli_up_status_down(tmp_path: Path) -> None:
    exe = [sys.executable, "-c", "import sys; from udpflannel.cli import main; sys.exit(main())"]
    root = ["lab", "--state-root", str(tmp_path)]
    before = lab_namespaces()
    try:
        up = subprocess.run([*exe, *root, "up"], capture_output=True, text=True, timeout=60)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "node1" in up.stdout and "pod node3-p1" in up.stdout
        status = subprocess.run([*exe, *root, "status"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "running" in status.stdout and "EXITED" not in status.stdout
        trace = subprocess.run(
            [*exe, "trace", "--state-root", str(tmp_path), "--from", "node3-p1", "--to", "node1-p0"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "trace: one ICMP echo request node3-p1" in trace.stdout, trace.stdout + trace.stderr
        assert "hop 8  node1-p0 eth0" in trace.stdout and "pcaps: " in trace.stdout
        assert trace.returncode == (0 if "seen at 8/8 hops; echo reply received" in trace.stdout else 1)
    finally:
        down = subprocess.run([*exe, *root, "down"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "removed" in down.stdout
    prefix = up.stdout.split()[1].rstrip(":")  # "lab <prefix>: ..."
    assert_nothing_left(prefix, tmp_path)
    assert lab_namespaces() <= before
