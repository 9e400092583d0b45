"""lab/netns.py: a lab or benchmark process stopped with SIGTERM removes what it made, as after Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from udpflannel.lab.netns import run_prefix

STOPPED_LAB = """
import sys, time
from udpflannel.lab.netns import Lab, exit_on_sigterm
exit_on_sigterm()
with Lab(prefix=sys.argv[1]) as lab:
    lab.netns("a")
    print("ready", flush=True)
    time.sleep(30)
"""


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces")
def test_sigterm_takes_the_lab_down() -> None:
    prefix = run_prefix()
    proc = subprocess.Popen([sys.executable, "-c", STOPPED_LAB, prefix], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert f"{prefix}-a" in namespaces()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if f"{prefix}-a" in namespaces():  # never leave it behind, even when the test fails
            subprocess.run(["ip", "netns", "del", f"{prefix}-a"], check=False)
    assert f"{prefix}-a" not in namespaces()
