"""The vxlan and udp backends started for real in a namespace: TUN name, MTU, address and cluster route as
flannel sets them, worker processes running, and nothing left behind after stop."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest

from udpflannel.lab.netns import Lab
from udpflannel.lab.runner import runner_command

pytestmark = pytest.mark.root
if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
    pytest.skip("needs root and /dev/net/tun", allow_module_level=True)


@pytest.mark.parametrize(("kind", "tun", "mtu"), [("vxlan", "flannel.1", 1450), ("udp", "flannel0", 1472)])
def test_start_configures_host_and_stop_cleans_up(kind, tun, mtu):
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        a = lab.netns("a")
        b = lab.netns("b")
        lab.veth(a, b, "198.18.0.1/16", "198.18.0.2/16")
        cmd = runner_command(
            kind, network="198.19.0.0/16", subnet="198.19.1.0/24", subnet_file=f"{tmp}/subnet.env"
        )
        proc = subprocess.Popen(a.cmd(*cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            ready = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            assert ready["ready"] and ready["mtu"] == mtu and len(ready["pids"]) >= 1
            link = json.loads(a.exec("ip", "-j", "addr", "show", "dev", tun))[0]
            assert link["mtu"] == mtu and "UP" in link["flags"]
            assert {(x["local"], x["prefixlen"]) for x in link["addr_info"] if x["family"] == "inet"} == {
                ("198.19.1.0", 32)
            }
            assert f"198.19.0.0/16 dev {tun}" in a.exec("ip", "route")
            proc.stdin.write('{"op": "stats"}\n')  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            stats = json.loads(proc.stdout.readline())["stats"]  # type: ignore[union-attr]
            assert stats["workers_alive"] == len(ready["pids"]) and stats["drop_internal_error"] == 0
            listening = a.exec("ss", "-uln")
            assert (":8472" if kind == "vxlan" else ":8285") in listening
        finally:
            proc.stdin.close()  # type: ignore[union-attr]
            assert proc.wait(timeout=15) == 0
        assert tun not in a.exec("ip", "link")
        assert "198.19." not in a.exec("ip", "route")
        for pid in ready["pids"]:
            assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its backend"
        if kind == "vxlan":
            assert os.path.exists(f"{tmp}/udpflannel-vtep-mac.flannel.1")
