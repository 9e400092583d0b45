"""Helpers shared by the lease tests (a fake clock, test node attributes, store capability names)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from udpflannel.lease.model import LeaseAttrs

# Capabilities a backend may lack; contract tests that need one skip with a reason when it is missing.
CAP_RESERVE = "reserve"  # Store.reserve() works (the Kubernetes store has no reservations)
CAP_COMPACT = "compact"  # StoreBackend.compact can make old revisions unavailable
ALL_CAPS = frozenset({CAP_RESERVE, CAP_COMPACT})


@dataclass
class FakeClock:
    """Unix time that moves only when a test says so."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def node_attrs(n: int, backend_type: str = "vxlan") -> LeaseAttrs:
    """Attributes of test node n: PublicIP 198.18.0.n (underlay range, DESIGN.md safety rules)."""
    return LeaseAttrs(
        public_ip=ipaddress.IPv4Address(f"198.18.0.{n}"),
        backend_type=backend_type,
        backend_data={"VNI": 1, "VtepMAC": f"02:00:00:00:00:{n:02x}"},
    )
