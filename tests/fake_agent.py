"""A stand-in for `udpflannel run` in lab tests (the lab's plumbing is under test, not the agent): it writes
subnet.env as the agent does (198.19.<n>.1/24, atomically), then idles, bounded, like an agent holding its
lease. Pass `fake_agent` (or `fake_agent_with(mtu=...)`) as lab.runtime.up's `agent`."""

from __future__ import annotations

import sys
from collections.abc import Callable

from udpflannel.lab import topology
from udpflannel.lab.runtime import LabState

_SCRIPT = (
    "import os, sys, time\n"
    "path, n, mtu = sys.argv[1], sys.argv[2], sys.argv[3]\n"
    "body = f'FLANNEL_NETWORK=198.19.0.0/16\\nFLANNEL_SUBNET=198.19.{n}.1/24\\n'\n"
    "body += f'FLANNEL_MTU={mtu}\\nFLANNEL_IPMASQ=false\\n'\n"
    "open(path + '.tmp', 'w').write(body)\n"
    "os.replace(path + '.tmp', path)\n"
    "time.sleep(120)\n"
)


def fake_agent_with(*, mtu: int = 1450) -> Callable[[LabState, topology.Node], list[str]]:
    def command(state: LabState, node: topology.Node) -> list[str]:
        n = list(state.nodes).index(node.name) + 1
        subnet_env = state.node_dir(node.name) / "subnet.env"
        return [sys.executable, "-c", _SCRIPT, str(subnet_env), str(n), str(mtu)]

    return command


fake_agent = fake_agent_with()
