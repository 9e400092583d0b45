"""The Store protocol contract (udpflannel/lease/store.py), run against every store in STORE_BACKENDS.

TTLs here are whole seconds and time moves by whole seconds with a margin, so stores that expire leases on
their own (etcd) can run this suite with a real-time `advance`.
"""

from __future__ import annotations

import ipaddress

import pytest
from lease_helpers import CAP_COMPACT, CAP_RESERVE, node_attrs

from udpflannel.lease.model import EventType, Lease, subnet_key
from udpflannel.lease.store import Compacted, Conflict, NotFound

NET_A = ipaddress.IPv4Network("198.19.1.0/24")
NET_B = ipaddress.IPv4Network("198.19.2.0/24")
NET_C = ipaddress.IPv4Network("198.19.3.0/24")
NET6_A = ipaddress.IPv6Network("fd00:198:0:1::/64")
TTL = 4.0
LONG_TTL = 3600.0


def keys(leases: list[Lease]) -> list[str]:
    return sorted(lease.key for lease in leases)


def drain(store, after: int, *, want: int, timeout: float = 5.0):
    """Collect watch events after `after` until `want` arrived (bounded by a few watch calls)."""
    events = []
    for _ in range(want + 5):
        if len(events) >= want:
            break
        batch = store.watch(after=after, timeout=timeout)
        if not batch:
            break
        events.extend(batch)
        after = batch[-1].revision
    return events


def test_create_then_list_round_trip(store_factory):
    store, _ = store_factory()
    before = store.list().revision
    lease = store.create(NET_A, None, node_attrs(1), LONG_TTL)
    assert lease.subnet == NET_A and lease.ipv6_subnet is None
    assert lease.attrs == node_attrs(1)
    assert lease.expiration is not None and not lease.is_reservation
    assert lease.revision > before

    snap = store.list()
    assert snap.revision >= lease.revision
    [listed] = snap.leases
    assert listed.key == subnet_key(NET_A)
    assert listed.attrs == node_attrs(1)
    assert listed.revision == lease.revision


def test_dual_stack_lease_round_trip(store_factory):
    store, _ = store_factory()
    store.create(NET_A, NET6_A, node_attrs(1), LONG_TTL)
    [listed] = store.list().leases
    assert (listed.subnet, listed.ipv6_subnet) == (NET_A, NET6_A)
    assert listed.key == "198.19.1.0-24&fd00:198:0:1::-64"


def test_create_conflicts_when_key_is_held(store_factory):
    store, _ = store_factory()
    other, _ = store_factory()  # a second agent on the same store
    store.create(NET_A, None, node_attrs(1), LONG_TTL)
    with pytest.raises(Conflict):
        other.create(NET_A, None, node_attrs(2), LONG_TTL)
    [listed] = other.list().leases
    assert listed.attrs.public_ip == node_attrs(1).public_ip


def test_lease_expires_after_ttl(store_factory):
    store, advance = store_factory()
    store.create(NET_A, None, node_attrs(1), TTL)
    store.create(NET_B, None, node_attrs(2), LONG_TTL)
    advance(TTL - 2)
    assert keys(store.list().leases) == [subnet_key(NET_A), subnet_key(NET_B)]
    advance(4)
    assert keys(store.list().leases) == [subnet_key(NET_B)]
    # The expired subnet is free again.
    taken = store.create(NET_A, None, node_attrs(3), LONG_TTL)
    assert taken.attrs.public_ip == node_attrs(3).public_ip


def test_expiry_is_a_removed_event(store_factory):
    store, advance = store_factory()
    lease = store.create(NET_A, None, node_attrs(1), TTL)
    rev = store.list().revision
    advance(TTL + 2)
    events = drain(store, rev, want=1)
    assert [(e.type, e.lease.key) for e in events] == [(EventType.REMOVED, lease.key)]
    assert events[0].lease.attrs == node_attrs(1)  # REMOVED carries what was removed


def test_renew_extends_the_lease(store_factory):
    store, advance = store_factory()
    lease = store.create(NET_A, None, node_attrs(1), TTL)
    advance(TTL - 1)
    renewed = store.renew(lease, node_attrs(1), TTL)
    assert renewed.revision > lease.revision
    assert renewed.expiration is not None and lease.expiration is not None
    assert renewed.expiration > lease.expiration
    advance(TTL - 1)  # past the first expiry, within the renewed one
    assert keys(store.list().leases) == [lease.key]
    advance(TTL)
    assert store.list().leases == []


def test_renew_updates_attributes(store_factory):
    store, _ = store_factory()
    lease = store.create(NET_A, None, node_attrs(1), LONG_TTL)
    new_attrs = node_attrs(1, backend_type="wireguard")
    renewed = store.renew(lease, new_attrs, LONG_TTL)
    assert renewed.attrs == new_attrs
    [listed] = store.list().leases
    assert listed.attrs == new_attrs and listed.revision == renewed.revision


def test_renew_with_stale_revision_conflicts(store_factory):
    store, _ = store_factory()
    lease = store.create(NET_A, None, node_attrs(1), LONG_TTL)
    store.renew(lease, node_attrs(1), LONG_TTL)
    with pytest.raises(Conflict):
        store.renew(lease, node_attrs(1), LONG_TTL)  # `lease` is one revision behind now


def test_renew_of_expired_lease_is_not_found(store_factory):
    store, advance = store_factory()
    lease = store.create(NET_A, None, node_attrs(1), TTL)
    advance(TTL + 2)
    with pytest.raises(NotFound):
        store.renew(lease, node_attrs(1), TTL)


def test_renew_of_a_lease_taken_by_another_node_conflicts(store_factory):
    store, advance = store_factory()
    lease = store.create(NET_A, None, node_attrs(1), TTL)
    advance(TTL + 2)
    store.create(NET_A, None, node_attrs(2), LONG_TTL)
    with pytest.raises(Conflict):
        store.renew(lease, node_attrs(1), LONG_TTL)
    [listed] = store.list().leases
    assert listed.attrs.public_ip == node_attrs(2).public_ip


def test_delete(store_factory):
    store, _ = store_factory()
    lease = store.create(NET_A, None, node_attrs(1), LONG_TTL)
    store.create(NET_B, None, node_attrs(2), LONG_TTL)
    store.delete(lease)
    assert keys(store.list().leases) == [subnet_key(NET_B)]
    with pytest.raises(NotFound):
        store.delete(lease)
    store.create(NET_A, None, node_attrs(3), LONG_TTL)  # the key is free again


def test_delete_with_stale_revision_conflicts(store_factory):
    store, _ = store_factory()
    lease = store.create(NET_A, None, node_attrs(1), LONG_TTL)
    store.renew(lease, node_attrs(1), LONG_TTL)
    with pytest.raises(Conflict):
        store.delete(lease)
    assert keys(store.list().leases) == [lease.key]


def test_reservation_never_expires_and_only_its_public_ip_takes_it(store_factory):
    store_factory.require(CAP_RESERVE)
    store, advance = store_factory()
    reserved = store.reserve(NET_A, None, node_attrs(1))
    assert reserved.is_reservation and reserved.expiration is None
    advance(TTL + 2)
    [listed] = store.list().leases
    assert listed.is_reservation and listed.attrs.public_ip == node_attrs(1).public_ip

    with pytest.raises(Conflict):
        store.create(NET_A, None, node_attrs(2), LONG_TTL)
    with pytest.raises(Conflict):
        store.renew(listed, node_attrs(2), LONG_TTL)  # another PublicIP cannot take it over by renewing
    with pytest.raises(Conflict):
        store.reserve(NET_A, None, node_attrs(2))

    # Its owner renews it (e.g. new BackendData); it stays a reservation.
    mine = store.renew(listed, node_attrs(1, backend_type="wireguard"), TTL)
    assert mine.is_reservation
    advance(TTL + 2)
    [again] = store.list().leases
    assert again.is_reservation and again.attrs.backend_type == "wireguard"


def test_reserve_turns_own_lease_into_reservation(store_factory):
    store_factory.require(CAP_RESERVE)
    store, advance = store_factory()
    store.create(NET_A, None, node_attrs(1), TTL)
    store.reserve(NET_A, None, node_attrs(1))
    advance(TTL + 2)
    [listed] = store.list().leases
    assert listed.is_reservation


def test_watch_reports_changes_in_order(store_factory):
    store, _ = store_factory()
    writer, _ = store_factory()
    rev = store.list().revision
    a = writer.create(NET_A, None, node_attrs(1), LONG_TTL)
    b = writer.create(NET_B, None, node_attrs(2), LONG_TTL)
    a2 = writer.renew(a, node_attrs(1, backend_type="udp"), LONG_TTL)
    writer.delete(b)
    events = drain(store, rev, want=4)
    assert [(e.type, e.lease.key) for e in events] == [
        (EventType.ADDED, a.key),
        (EventType.ADDED, b.key),
        (EventType.ADDED, a.key),
        (EventType.REMOVED, b.key),
    ]
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == 4
    assert events[2].lease.attrs.backend_type == "udp"
    assert events[2].revision == a2.revision


def test_watch_resumes_from_a_revision_without_loss_or_duplicates(store_factory):
    store, _ = store_factory()
    rev0 = store.list().revision
    subnets = [ipaddress.IPv4Network(f"198.19.{i}.0/24") for i in range(10, 16)]
    for i, net in enumerate(subnets[:3]):
        store.create(net, None, node_attrs(10 + i), LONG_TTL)
    first = drain(store, rev0, want=3)
    assert len(first) == 3
    for i, net in enumerate(subnets[3:]):
        store.create(net, None, node_attrs(13 + i), LONG_TTL)
    # Resume from the middle of the first batch: everything after it, once.
    resumed = drain(store, first[1].revision, want=4)
    seen = [e.lease.key for e in first[:2] + resumed]
    assert seen == [subnet_key(net) for net in subnets]


def test_list_then_watch_loses_nothing(store_factory):
    store, _ = store_factory()
    store.create(NET_A, None, node_attrs(1), LONG_TTL)
    snap = store.list()
    store.create(NET_B, None, node_attrs(2), LONG_TTL)
    events = drain(store, snap.revision, want=1)
    assert [(e.type, e.lease.key) for e in events] == [(EventType.ADDED, subnet_key(NET_B))]


def test_watch_timeout_returns_empty(store_factory):
    store, _ = store_factory()
    store.create(NET_A, None, node_attrs(1), LONG_TTL)
    rev = store.list().revision
    assert store.watch(after=rev, timeout=0.3) == []


def test_watch_of_compacted_revision_raises(store_factory):
    store_factory.require(CAP_COMPACT)
    store, _ = store_factory()
    rev0 = store.list().revision
    lease = store.create(NET_A, None, node_attrs(1), LONG_TTL)
    for _ in range(5):
        lease = store.renew(lease, node_attrs(1), LONG_TTL)
    store_factory.backend.compact(1)
    with pytest.raises(Compacted):
        store.watch(after=rev0, timeout=0.1)
    # A fresh listing gives a revision to resume from.
    snap = store.list()
    assert store.watch(after=snap.revision, timeout=0.1) == []
    store.create(NET_C, None, node_attrs(3), LONG_TTL)
    events = drain(store, snap.revision, want=1)
    assert [e.lease.key for e in events] == [subnet_key(NET_C)]
