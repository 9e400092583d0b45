"""Lab up/down: namespaces, underlay, pods and agent processes appear, and `down` leaves nothing behind, also
when building fails half-way or an agent dies. The agent here is a stand-in process that writes subnet.env
like `udpflannel run` does (the lab's plumbing is under test, not the agent); test_lab_demo.py runs the real
one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_agent import fake_agent

from udpflannel.lab import topology
from udpflannel.lab.netns import LabError, leftover_namespaces
from udpflannel.lab.runtime import LabState, down, find_labs, up

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")

REPO = Path(__file__).resolve().parents[2]
THREE_NODE = REPO / "containerlab" / "three-node.clab.yml"


def dead_agent(state: LabState, node: topology.Node) -> list[str]:
    return [
        sys.executable,
        "-c",
        f"import sys; print('agent for {node.name} gives up'); sys.exit(3)",
        str(state.dir),
    ]


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the lab directory is in every agent's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def assert_nothing_left(prefix: str, directory: Path) -> None:
    assert leftover_namespaces(prefix) == []
    assert processes_mentioning(str(directory)) == []
    assert not directory.exists()


def ns_exec(ns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=10)


def test_up_builds_nodes_pods_and_down_from_state_removes_all(tmp_path: Path) -> None:
    topo = topology.load(THREE_NODE)
    labrun = up(topo, root=tmp_path, agent=fake_agent, log=lambda _: None)
    state = labrun.state
    try:
        assert find_labs(tmp_path) == [state.path]
        assert sorted(leftover_namespaces(state.prefix)) == sorted(state.namespaces), state.prefix
        assert len(state.namespaces) == 3 + 1 + 6  # nodes, the underlay bridge, two pods per node
        assert [n.subnet for n in state.nodes.values()] == ["198.19.1.0/24", "198.19.2.0/24", "198.19.3.0/24"]
        node1, node3 = state.nodes["node1"], state.nodes["node3"]
        # Underlay: one L2 segment, in wire mode (tx checksum offload off).
        underlay = ns_exec(node1.ns, "ping", "-c", "1", "-W", "2", "198.18.0.3")
        assert underlay.returncode == 0, underlay.stdout + underlay.stderr
        features = ns_exec(node1.ns, "ethtool", "-k", "eth1").stdout
        assert "tx-checksumming: off" in features
        # Pods: cni0 gateway, the pod's default route, FLANNEL_MTU, reachability inside the node.
        pod0, pod1 = node1.pods
        assert (pod0.ip, pod1.ip) == ("198.19.1.2", "198.19.1.3")
        assert "default via 198.19.1.1 dev eth0" in ns_exec(pod0.ns, "ip", "route").stdout
        assert "mtu 1450" in ns_exec(pod0.ns, "ip", "link", "show", "eth0").stdout
        assert "198.19.1.1/24" in ns_exec(node1.ns, "ip", "addr", "show", "cni0").stdout
        local = ns_exec(pod0.ns, "ping", "-c", "1", "-W", "2", pod1.ip)
        assert local.returncode == 0, local.stdout + local.stderr
        # No dataplane here, so the other node's pod is unreachable: the lab itself does not leak routes.
        assert ns_exec(pod0.ns, "ping", "-c", "1", "-W", "1", node3.pods[0].ip).returncode != 0
        agents = processes_mentioning(state.dir)
        assert len(agents) == 3, [Path(f"/proc/{p}/cmdline").read_bytes() for p in agents]
    finally:
        # `down` as another process would do it: from the state directory alone.
        removed = down(state.path)
        labrun.lab.close()  # reap our own children (already killed)
    assert f"agent node1 (pid {state.nodes['node1'].pid})" in removed
    assert_nothing_left(state.prefix, state.path)


def test_failure_while_building_removes_what_was_made(tmp_path: Path) -> None:
    topo = topology.load(THREE_NODE)
    made: list[LabState] = []

    def agent_then_fail(state: LabState, node: topology.Node) -> list[str]:
        made.append(state)
        if node.name == "node3":
            raise LabError("simulated failure while starting node3's agent")
        return fake_agent(state, node)

    with pytest.raises(LabError, match="simulated failure"):
        up(topo, root=tmp_path, agent=agent_then_fail, log=lambda _: None)
    state = made[0]
    assert state.nodes["node1"].pid is not None  # two agents were running when it failed
    assert_nothing_left(state.prefix, state.path)


def test_dead_agents_mean_no_lease_no_pods_and_clean_down(tmp_path: Path) -> None:
    topo = topology.load(THREE_NODE)
    logs: list[str] = []
    labrun = up(topo, root=tmp_path, agent=dead_agent, lease_timeout=5, log=logs.append)
    state = labrun.state
    try:
        assert all(n.subnet is None and n.pods == [] for n in state.nodes.values())
        text = "\n".join(logs)
        assert "node node2 has no lease (agent exited)" in text
        assert "agent for node2 gives up" in text  # the agent's own words reach the user
    finally:
        labrun.close()
    assert_nothing_left(state.prefix, state.path)


def test_cli_down_removes_every_lab_under_the_root(tmp_path: Path) -> None:
    from udpflannel.lab.cli import cmd_down, cmd_status

    topo = topology.load(THREE_NODE)
    runs = [up(topo, root=tmp_path, agent=fake_agent, log=lambda _: None) for _ in range(2)]
    try:
        args = type("Args", (), {"state_root": tmp_path, "prefix": None})()
        assert cmd_status(args) == 0
        assert cmd_down(args) == 0
    finally:
        for r in runs:
            r.close()
    for r in runs:
        assert_nothing_left(r.state.prefix, r.state.path)
    assert find_labs(tmp_path) == []


def stuck_agent(state: LabState, node: topology.Node) -> list[str]:
    code = "import time\ndef waiting_for_a_lease_forever():\n    time.sleep(120)\n"
    code += "waiting_for_a_lease_forever()\n"
    return [sys.executable, "-c", code, str(state.dir)]


def test_stuck_agent_is_reported_with_where_it_hangs(tmp_path: Path) -> None:
    topo = topology.load(THREE_NODE)
    logs: list[str] = []
    labrun = up(topo, root=tmp_path, agent=stuck_agent, lease_timeout=1.5, log=logs.append)
    state = labrun.state
    try:
        text = "\n".join(logs)
        assert "node node1 has no lease (no subnet.env after 2 s)" in text
        assert all(n.pods == [] for n in state.nodes.values())
        if Path(sys.executable).with_name("py-spy").exists():
            assert "py-spy dump of the stuck agent:" in text
            assert "waiting_for_a_lease_forever" in text
    finally:
        labrun.close()
    assert_nothing_left(state.prefix, state.path)


@pytest.mark.parametrize("timeout", ["-5", "0", "nan", "inf", "x", "3601"])
def test_cli_refuses_a_lease_timeout_that_is_no_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], timeout: str
) -> None:
    """Before anything is built: a negative wait once built the lab, timed out at once and printed every
    agent's stack."""
    from udpflannel.lab.cli import main

    assert main(["--state-root", str(tmp_path), "up", "--lease-timeout", timeout, str(THREE_NODE)]) == 2
    assert "give a time between 0 and 3600" in capsys.readouterr().err
    assert find_labs(tmp_path) == []


def test_cli_says_when_the_state_root_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from udpflannel.lab.cli import main

    (tmp_path / "plain").write_text("")
    root = tmp_path / "plain" / "labs"  # under a regular file: no directory can be made there
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert main(["--state-root", str(root), "up", str(THREE_NODE)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("udpflannel lab up: ")
    assert "give a writable --state-root" in err
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before
