"""Shared helper of the interop tests that run the real agent (`udpflannel run`) in namespaces."""

from __future__ import annotations

import pathlib
import time


def env_file(path: pathlib.Path, deadline: float) -> dict[str, str]:
    """The agent's subnet.env once it exists (bounded by `deadline`, a time.monotonic() value); else an
    AssertionError carrying the tail of every agent log beside it."""
    while time.monotonic() < deadline:
        if path.exists():
            return dict(line.split("=", 1) for line in path.read_text().split())
        time.sleep(0.1)
    logs = "\n".join(p.read_text()[-1500:] for p in path.parents[1].glob("*.log"))
    raise AssertionError(f"{path} never appeared; agent logs:\n{logs}")
