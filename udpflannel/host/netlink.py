"""Netlink requests for host/, answered by a short-lived child process that imports pyroute2, so the agent
never does: pyroute2's import is ~17 MB of Python objects a process keeps for life (DESIGN.md memory
budget), more than the rest of the control plane, and the agent needs netlink only at start and stop.

One child per session: a few requests, then close(); what the child runs is host/netlink_ops.py.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from typing import Any

# Longest a request may take: link_index waits up to a few seconds for a worker's TUN, the rest are
# single netlink round trips. Past this the child is presumed stuck and killed.
REQUEST_TIMEOUT = 30.0


class NetlinkError(RuntimeError):
    """A request failed in the child: the kernel's (or pyroute2's) message, and its errno if it has one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class Netlink:
    """A child process holding one pyroute2 IPRoute in this process's network namespace."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = subprocess.Popen(
            [sys.executable, "-m", "udpflannel.host.netlink_ops"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def call(self, op: str, **args: Any) -> Any:
        """Run one request; its result as plain data (ints, strings, lists), or NetlinkError."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise NetlinkError("netlink helper is closed")
        try:
            proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
            proc.stdin.flush()
        except OSError as exc:
            raise NetlinkError(f"netlink helper is gone ({exc}); see the error it printed above") from None
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if time.monotonic() >= deadline:
                self.close()
                raise NetlinkError(f"netlink helper gave no answer to {op} in {REQUEST_TIMEOUT:.0f} s")
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            raise NetlinkError(f"netlink helper exited with code {code}; see the error it printed above")
        answer = json.loads(line)
        if "error" in answer:
            raise NetlinkError(answer["error"], answer.get("code"))
        return answer["ok"]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the child's end of input: it exits
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
