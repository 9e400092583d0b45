"""PeerTracker: pure lease diffing, table-driven (flannel's pkg/lease/lease_test.go cases, plus ours)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from lease_helpers import node_attrs

from udpflannel.lease.manager import PeerTracker
from udpflannel.lease.model import Event, EventType, Lease

ADDED, REMOVED = EventType.ADDED, EventType.REMOVED


def lease(
    i: int, *, node: int | None = None, backend: str = "vxlan", rev: int = 1, exp: float = 100.0
) -> Lease:
    """Lease of subnet 198.19.i.0/24 held by node `node` (default i)."""
    return Lease(
        subnet=ipaddress.IPv4Network(f"198.19.{i}.0/24"),
        attrs=node_attrs(node if node is not None else i, backend_type=backend),
        expiration=exp,
        revision=rev,
    )


OWN = lease(9)


def octet(le: Lease) -> int:
    assert le.subnet is not None
    return le.subnet.network_address.packed[2]


def summary(events: list[Event]) -> list[tuple[str, int, str]]:
    """(type, third octet of the subnet, backend type) per event: short enough for one-line table rows."""
    return [(e.type.value, octet(e.lease), e.lease.attrs.backend_type) for e in events]


def A(i: int, backend: str = "vxlan") -> tuple[str, int, str]:
    return ("added", i, backend)


def R(i: int, backend: str = "vxlan") -> tuple[str, int, str]:
    return ("removed", i, backend)


@dataclass(frozen=True)
class ResetCase:
    name: str
    before: list[Lease]
    after: list[Lease]
    want: list[tuple[str, int, str]]


RESET_CASES = [
    ResetCase("empty to empty", [], [], []),
    ResetCase("all new", [], [lease(1), lease(2)], [A(1), A(2)]),
    ResetCase("all gone", [lease(1), lease(2)], [], [R(1), R(2)]),
    ResetCase("unchanged", [lease(1)], [lease(1)], []),
    ResetCase("renewed only", [lease(1)], [lease(1, rev=7, exp=500.0)], []),
    ResetCase("attributes changed", [lease(1)], [lease(1, backend="wireguard", rev=7)], [A(1, "wireguard")]),
    ResetCase("taken by another node", [lease(1)], [lease(1, node=5, rev=7)], [A(1)]),
    ResetCase(
        "mixed",
        [lease(1), lease(2), lease(3)],
        [lease(2), lease(3, backend="udp"), lease(4)],
        [R(1), A(3, "udp"), A(4)],
    ),
    ResetCase("own lease never reported", [], [OWN, lease(1)], [A(1)]),
]  # fmt: skip


@pytest.mark.parametrize("case", RESET_CASES, ids=lambda c: c.name)
def test_reset(case: ResetCase):
    tracker = PeerTracker(own_key=OWN.key)
    tracker.reset(case.before)
    assert summary(tracker.reset(case.after)) == case.want
    assert [x.key for x in tracker.peers()] == sorted(x.key for x in case.after if x.key != OWN.key)


@dataclass(frozen=True)
class UpdateCase:
    name: str
    known: list[Lease]
    events: list[Event]
    want: list[tuple[str, int, str]]
    peers: list[int]  # third octets of the peers afterwards


def ev(kind: EventType, le: Lease) -> Event:
    return Event(kind, le, le.revision)


UPDATE_CASES = [
    UpdateCase("new peer", [], [ev(ADDED, lease(1))], [A(1)], [1]),
    UpdateCase("renewal is silent", [lease(1)], [ev(ADDED, lease(1, rev=5, exp=900.0))], [], [1]),
    UpdateCase("new attributes", [lease(1)], [ev(ADDED, lease(1, backend="udp"))], [A(1, "udp")], [1]),
    UpdateCase("removal of a known peer", [lease(1), lease(2)], [ev(REMOVED, lease(1, rev=5))], [R(1)], [2]),
    UpdateCase("removal of an unknown lease is silent", [lease(2)], [ev(REMOVED, lease(1, rev=5))], [], [2]),
    UpdateCase("own lease ignored", [], [ev(ADDED, OWN), ev(REMOVED, OWN)], [], []),
    UpdateCase(
        "add, remove, add again in one batch",
        [],
        [ev(ADDED, lease(1)), ev(REMOVED, lease(1, rev=2)), ev(ADDED, lease(1, node=7, rev=3))],
        [A(1), R(1), A(1)],
        [1],
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: c.name)
def test_update(case: UpdateCase):
    tracker = PeerTracker(own_key=OWN.key)
    tracker.reset(case.known)
    assert summary(tracker.update(case.events)) == case.want
    assert [octet(x) for x in tracker.peers()] == case.peers


def test_update_keeps_the_latest_lease():
    tracker = PeerTracker()
    tracker.update([ev(ADDED, lease(1))])
    tracker.update([ev(ADDED, lease(1, rev=8, exp=999.0))])
    [peer] = tracker.peers()
    assert (peer.revision, peer.expiration) == (8, 999.0)


def test_own_key_moving_onto_a_tracked_peer_removes_it():
    tracker = PeerTracker(own_key=OWN.key)
    tracker.reset([lease(1), lease(2)])
    events = tracker.set_own_key(lease(1).key)
    assert summary(events) == [R(1)]
    assert [x.key for x in tracker.peers()] == [lease(2).key]
    assert tracker.set_own_key(lease(5).key) == []
