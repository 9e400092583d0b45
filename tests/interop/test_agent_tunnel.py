"""The vxlan and udp backends through the real agent: two `udpflannel run` processes in two namespaces
share an embedded lease store, learn each other from it, and carry pings and a checked TCP transfer."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

import pytest
from agent_run import env_file
from tunnel_lab import KERNEL_TUNNEL_TAP

from udpflannel.lab.netns import Lab
from udpflannel.lab.transfer import SINK, SOURCE

pytestmark = [pytest.mark.root, pytest.mark.slow]
if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
    pytest.skip("needs root and /dev/net/tun", allow_module_level=True)

REPO = pathlib.Path(__file__).resolve().parents[2]


def _children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (the agent's datapath workers)."""
    out = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.parametrize(("kind", "mtu"), [("vxlan", "1450"), ("udp", "1472")])
def test_two_agents_find_each_other_and_carry_traffic(kind, mtu):
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="udpflannel-agent-") as tmp, ExitStack() as stack:
        root = pathlib.Path(tmp)
        (root / "net-conf.json").write_text(
            json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": kind}})
        )
        a, b = lab.netns("a"), lab.netns("b")
        lab.veth(a, b, "198.18.0.1/16", "198.18.0.2/16")
        for ns in (a, b):  # as on a node with Docker: the agent's FORWARD rules must let its traffic through
            ns.exec("iptables", "-P", "FORWARD", "DROP")
        procs = []
        logs = [stack.enter_context(open(root / f"{name}.log", "w")) for name in ("a", "b")]
        for (name, ns), log in zip((("a", a), ("b", b)), logs, strict=True):
            (root / name).mkdir()
            cmd = [
                sys.executable, "-c", "import sys; from udpflannel.cli import main; sys.exit(main())",
                "run", "--iface", "eth0",
                f"--sqlite-path={root / 'leases.db'}", f"--net-config-path={root / 'net-conf.json'}",
                f"--subnet-file={root / name / 'subnet.env'}",
            ]  # fmt: skip
            procs.append(ns.popen(*cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=log))
        deadline = time.monotonic() + 30
        env_a = env_file(root / "a" / "subnet.env", deadline)
        env_b = env_file(root / "b" / "subnet.env", deadline)
        assert env_a["FLANNEL_MTU"] == env_b["FLANNEL_MTU"] == mtu
        ip_a = env_a["FLANNEL_SUBNET"].split("/")[0].rsplit(".", 1)[0] + ".0"
        ip_b = env_b["FLANNEL_SUBNET"].split("/")[0].rsplit(".", 1)[0] + ".0"
        assert ip_a != ip_b
        # The peer arrives through the store's watch: allow it a few seconds.
        for _ in range(40):
            if (
                a.exec("ping", "-c", "1", "-W", "1", ip_b, check=False, timeout=10)
                and not subprocess.run(
                    a.cmd("ping", "-c", "1", "-W", "1", ip_b), capture_output=True
                ).returncode
            ):
                break
            time.sleep(0.25)
        a.exec("ping", "-c", "3", "-i", "0.2", "-W", "2", ip_b, timeout=20)
        b.exec("ping", "-c", "3", "-i", "0.2", "-W", "2", ip_a, timeout=20)
        sink = b.popen(sys.executable, "-c", SINK, ip_b, "7000", "60", stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
        out = a.exec(sys.executable, "-c", SOURCE, ip_b, "7000", str(20_000_000), "60", timeout=90)
        sent, digest, _, got_n, got_digest = out.split()
        assert sent == got_n and digest == got_digest
        # The superpackets went through the tunnel TAP (io/tunnel_tap.py) when this kernel has it (6.17+);
        # its frames are forwarded, so FLANNEL-FWD accepts them.
        tap = "flannel.1-tx" if kind == "vxlan" else "flannel0-tx"
        has_tap = tap in a.exec("ip", "link")
        assert has_tap is (f"-i {tap} -j ACCEPT" in a.exec("iptables", "-S", "FLANNEL-FWD"))
        assert has_tap is KERNEL_TUNNEL_TAP
        # The agent itself never loads numpy: only its datapath workers do (DESIGN.md, memory budget).
        maps = pathlib.Path(f"/proc/{procs[0].pid}/maps").read_text()
        assert "numpy" not in maps, "the agent process loaded numpy"
        # A datapath worker that dies is restarted by the agent's loop (nothing scrapes /metrics here).
        worker = _children(procs[0].pid)[0]
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.2)
        for _ in range(40):  # bounded: the loop checks about once a second
            if not subprocess.run(a.cmd("ping", "-c", "1", "-W", "1", ip_b), capture_output=True).returncode:
                break
        assert worker not in _children(procs[0].pid)
        a.exec("ping", "-c", "3", "-i", "0.2", "-W", "2", ip_b, timeout=20)
        assert "restarting it" in (root / "a.log").read_text()
        for p in procs:
            p.terminate()
        for p in procs:
            assert p.wait(timeout=20) == 0, (root / "a.log").read_text()[-2000:]
        tun = "flannel.1" if kind == "vxlan" else "flannel0"
        assert tun not in a.exec("ip", "link") and "198.19." not in a.exec("ip", "route")  # the TAP too
