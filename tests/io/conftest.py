"""Fixtures for I/O tests: skip without root, and a Lab of namespaces removed after each test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from udpflannel.lab.netns import Lab


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces, veths and TUN devices")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")


@pytest.fixture
def lab(root: None) -> Iterator[Lab]:
    with Lab() as lab:
        yield lab
