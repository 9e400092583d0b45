"""Suite-wide settings: where the golden captures from real peers live, and private_net.

shared/ sits beside the checkout (a developer's /work/shared, CI's copy beside its clone). A missing capture
is a failure, not a skip: the golden tests are the interop evidence.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from udpflannel.lab.netns import SERVICE_ADDR, Lab, in_netns

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("UDPFLANNEL_TESTDATA", str(REPO.parent / "shared" / "testdata"))


@pytest.fixture(scope="module")
def private_net() -> Iterator[str]:
    """For a module whose tests run their own servers in this process or as its children (etcd, the
    Kubernetes API double, the health server): the main thread joins a namespace of the module's own for
    the module, so every socket, thread and process its tests make is in there, and its servers listen on
    SERVICE_ADDR (yielded), its loopback address. Test traffic never touches the machine's network."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test's servers run inside a network namespace of its own")
    with Lab() as lab:
        ns = lab.private("net")
        with in_netns(ns.name):
            yield SERVICE_ADDR
