"""`python -m udpflannel.dataplane` (one vxlan or udp backend, peers fed as JSON lines on stdin) started in
a namespace: its command line and start-up, for the interop tests, backend tests and benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from udpflannel.lab.netns import Netns
from udpflannel.lab.transfer import read_json_line

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 20.0


def runner_command(
    backend: str,
    *,
    network: str,
    subnet: str,
    subnet_file: str | Path,
    iface: str = "eth0",
    network6: str | None = None,
    subnet6: str | None = None,
) -> list[str]:
    """The runner's command line (dual-stack when network6 and subnet6 are given)."""
    cmd = [sys.executable, "-m", "udpflannel.dataplane", "--backend", backend, "--iface", iface,
           "--network", network, "--subnet", subnet, "--subnet-file", str(subnet_file)]  # fmt: skip
    if network6 and subnet6:
        cmd += ["--network6", network6, "--subnet6", subnet6]
    return cmd


def start_runner(
    ns: Netns, cmd: list[str], env: dict[str, str] | None = None, **popen: object
) -> tuple[subprocess.Popen, dict]:
    """Start the runner in `ns` with pipes on stdin/stdout; returns it and its "ready" line (attrs, pids of
    its workers, offloads)."""
    proc = subprocess.Popen(
        ns.cmd(*cmd),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        **popen,  # type: ignore[arg-type]
    )
    return proc, read_json_line(proc, "ready", READY_TIMEOUT, "dataplane runner")
