"""LeaseManager over a real SqliteStore with a fake clock: allocation order, renewal, loss, peers."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random

import pytest
from lease_helpers import net_conf, node_attrs, subnet_env

from udpflannel.lease.manager import (
    MAX_ACQUIRE_TRIES,
    RANDOM_POOL,
    LeaseManager,
    SubnetsExhausted,
)
from udpflannel.lease.model import EventType, LeaseAttrs, subnet_key
from udpflannel.lease.sqlite import SqliteStore
from udpflannel.lease.store import Conflict, StoreError

V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network
TTL = 1000.0
MARGIN = 100.0
CONF = net_conf("198.19.0.0/16", 24)


@pytest.fixture
def store(tmp_path, fake_clock):
    s = SqliteStore(tmp_path / "leases.db", clock=fake_clock)
    yield s
    s.close()


def manager(store, n: int, conf=CONF, seed: int = 0, **kwargs) -> LeaseManager:
    kwargs.setdefault("ttl", TTL)
    kwargs.setdefault("renew_margin", MARGIN)
    return LeaseManager(store, conf, node_attrs(n), rng=random.Random(seed), **kwargs)


hint = subnet_env


class ConflictingStore:
    """Wraps a store; the first `n` create() calls lose a race: another node takes the subnet first."""

    def __init__(self, inner: SqliteStore, n: int) -> None:
        self.inner = inner
        self.left = n
        self.lost_subnets: list[V4] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create(self, subnet, ipv6_subnet, attrs, ttl):
        if self.left > 0:
            self.left -= 1
            self.inner.create(subnet, ipv6_subnet, node_attrs(200 + self.left), ttl)
            self.lost_subnets.append(subnet)
            return self.inner.create(subnet, ipv6_subnet, attrs, ttl)  # raises Conflict
        return self.inner.create(subnet, ipv6_subnet, attrs, ttl)


class AssignedStore:
    """A store that dictates our subnet, as the Kubernetes store does with the node's podCIDR."""

    def __init__(self, inner: SqliteStore, v4, v6=None) -> None:
        self.inner = inner
        self.assigned = (v4, v6)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def assigned_subnets(self):
        return self.assigned


# -- allocation ------------------------------------------------------------------------------------------


def test_fresh_lease_is_random_among_the_first_free_subnets(store, fake_clock):
    lease = manager(store, 1).acquire(fake_clock())
    assert lease.subnet is not None and lease.subnet.prefixlen == 24
    index = (int(lease.subnet.network_address) - int(V4("198.19.0.0/16").network_address)) >> 8
    assert 1 <= index <= RANDOM_POOL  # never the first subnet, and among the first 100 free
    assert lease.expiration == fake_clock() + TTL
    assert [x.key for x in store.list().leases] == [lease.key]


def test_random_pick_spreads_and_skips_taken_subnets(tmp_path, fake_clock):
    picks = set()
    for seed in range(20):
        s = SqliteStore(tmp_path / f"s{seed}.db", clock=fake_clock)
        try:
            for i in range(1, 51):  # the first 50 allocatable subnets are taken
                s.create(V4(f"198.19.{i}.0/24"), None, node_attrs(100), TTL)
            lease = manager(s, 1, seed=seed).acquire(fake_clock())
        finally:
            s.close()
        index = int(lease.subnet.network_address) >> 8 & 0xFF
        assert 51 <= index <= 50 + RANDOM_POOL, lease.subnet
        picks.add(index)
    assert len(picks) > 5  # random, not always the first free one


def test_reuses_the_lease_of_our_public_ip(store, fake_clock):
    old = store.create(V4("198.19.42.0/24"), None, node_attrs(1, backend_type="udp"), TTL)
    store.create(V4("198.19.43.0/24"), None, node_attrs(2), TTL)
    fake_clock.advance(10)
    lease = manager(store, 1).acquire(fake_clock())
    assert lease.key == old.key
    assert lease.attrs == node_attrs(1)  # our current attributes are published
    assert lease.revision > old.revision and lease.expiration == fake_clock() + TTL
    assert len(store.list().leases) == 2


def test_reuses_a_reservation_of_our_public_ip(store, fake_clock):
    store.reserve(V4("198.19.200.0/24"), None, node_attrs(1))
    lease = manager(store, 1).acquire(fake_clock())
    assert lease.key == subnet_key(V4("198.19.200.0/24"))
    assert lease.is_reservation
    fake_clock.advance(10 * TTL)
    assert [x.key for x in store.list().leases] == [lease.key]


def test_reservation_of_another_ip_is_never_taken(tmp_path, fake_clock):
    conf = net_conf("198.19.0.0/28", 30)  # allocatable: .4, .8, .12
    s = SqliteStore(tmp_path / "r.db", clock=fake_clock)
    try:
        s.reserve(V4("198.19.0.4/30"), None, node_attrs(9))
        s.reserve(V4("198.19.0.8/30"), None, node_attrs(9))
        lease = manager(s, 1, conf=conf).acquire(fake_clock())
        assert lease.subnet == V4("198.19.0.12/30")
        with pytest.raises(SubnetsExhausted):
            manager(s, 2, conf=conf).acquire(fake_clock())
    finally:
        s.close()


def test_reservation_of_another_length_blocks_the_subnets_it_covers(tmp_path, fake_clock):
    conf = net_conf("198.19.0.0/24", 26)  # allocatable: .64, .128, .192
    s = SqliteStore(tmp_path / "w.db", clock=fake_clock)
    try:
        s.reserve(V4("198.19.0.128/25"), None, node_attrs(9))  # covers .128/26 and .192/26
        assert manager(s, 1, conf=conf).acquire(fake_clock()).subnet == V4("198.19.0.64/26")
        with pytest.raises(SubnetsExhausted):
            manager(s, 2, conf=conf, subnet_file_hint=hint("198.19.0.193/26")).acquire(fake_clock())
        # Its owner gets the reservation itself, whatever its length.
        assert manager(s, 9, conf=conf).acquire(fake_clock()).subnet == V4("198.19.0.128/25")
    finally:
        s.close()


def test_lease_of_our_ip_from_an_old_config_is_replaced(store, fake_clock):
    old = store.create(V4("198.19.5.0/25"), None, node_attrs(1), TTL)  # SubnetLen used to be 25
    lease = manager(store, 1).acquire(fake_clock())
    assert lease.key != old.key and lease.subnet.prefixlen == 24
    assert [x.key for x in store.list().leases] == [lease.key]


def test_previous_subnet_env_is_honoured(store, fake_clock):
    lease = manager(store, 1, subnet_file_hint=hint("198.19.77.1/24")).acquire(fake_clock())
    assert lease.subnet == V4("198.19.77.0/24")


def test_public_ip_lease_beats_the_subnet_env(store, fake_clock):
    store.create(V4("198.19.42.0/24"), None, node_attrs(1), TTL)
    lease = manager(store, 1, subnet_file_hint=hint("198.19.77.1/24")).acquire(fake_clock())
    assert lease.subnet == V4("198.19.42.0/24")


@pytest.mark.parametrize(
    "previous",
    [
        "198.19.0.1/24",  # the first subnet of Network is never handed out
        "198.20.7.1/24",  # outside Network (and outside the test range: never created)
        "198.19.7.1/25",  # another SubnetLen
        "198.19.250.1/24",  # above SubnetMax
    ],
)
def test_subnet_env_hint_out_of_range_is_ignored(tmp_path, fake_clock, previous):
    conf = net_conf("198.19.0.0/16", 24, subnet_max="198.19.200.0/24")
    s = SqliteStore(tmp_path / "h.db", clock=fake_clock)
    try:
        lease = manager(s, 1, conf=conf, subnet_file_hint=hint(previous)).acquire(fake_clock())
    finally:
        s.close()
    assert lease.subnet != ipaddress.IPv4Interface(previous).network
    assert V4("198.19.1.0/24").network_address <= lease.subnet.network_address
    assert lease.subnet.network_address <= V4("198.19.200.0/24").network_address


def test_subnet_env_hint_taken_by_another_node_is_ignored(store, fake_clock):
    store.create(V4("198.19.77.0/24"), None, node_attrs(2), TTL)
    lease = manager(store, 1, subnet_file_hint=hint("198.19.77.1/24")).acquire(fake_clock())
    assert lease.subnet != V4("198.19.77.0/24")
    assert {x.attrs.public_ip for x in store.list().leases} == {
        node_attrs(1).public_ip,
        node_attrs(2).public_ip,
    }


def test_lost_race_is_retried_with_another_subnet(store, fake_clock, caplog):
    racing = ConflictingStore(store, n=3)
    with caplog.at_level(logging.INFO, logger="udpflannel.lease.manager"):
        lease = manager(racing, 1, subnet_file_hint=hint("198.19.77.1/24")).acquire(fake_clock())
    assert racing.lost_subnets[0] == V4("198.19.77.0/24")  # the hint lost the first race
    assert lease.subnet not in racing.lost_subnets
    assert lease.attrs == node_attrs(1)
    assert len(store.list().leases) == 4
    assert "lost a race" in caplog.text


def test_endless_lost_races_give_up(store, fake_clock):
    racing = ConflictingStore(store, n=MAX_ACQUIRE_TRIES)
    with pytest.raises(StoreError, match=f"in {MAX_ACQUIRE_TRIES} tries") as info:
        manager(racing, 1).acquire(fake_clock())
    assert not isinstance(info.value, Conflict)


def test_exhausted_range_names_the_config_and_the_fix(tmp_path, fake_clock):
    conf = net_conf("198.19.0.0/28", 30)
    s = SqliteStore(tmp_path / "x.db", clock=fake_clock)
    try:
        got = {manager(s, n, conf=conf).acquire(fake_clock()).subnet for n in (1, 2, 3)}
        assert got == {V4("198.19.0.4/30"), V4("198.19.0.8/30"), V4("198.19.0.12/30")}
        with pytest.raises(SubnetsExhausted) as info:
            manager(s, 4, conf=conf).acquire(fake_clock())
    finally:
        s.close()
    msg = str(info.value)
    for part in ("Network 198.19.0.0/28", "SubnetMin 198.19.0.4/30", "SubnetMax 198.19.0.12/30", "widen"):
        assert part in msg, msg


def test_first_subnet_is_never_handed_out_even_when_subnet_min_says_so(tmp_path, fake_clock):
    # Config validation refuses this SubnetMin; the manager still never leases the network's first subnet.
    conf = dataclasses.replace(net_conf("198.19.0.0/28", 30), subnet_min=V4("198.19.0.0/30"))
    s = SqliteStore(tmp_path / "f.db", clock=fake_clock)
    try:
        got = {manager(s, n, conf=conf, seed=n).acquire(fake_clock()).subnet for n in (1, 2, 3)}
        with pytest.raises(SubnetsExhausted):
            manager(s, 4, conf=conf).acquire(fake_clock())
        taken_by_hint = manager(s, 5, conf=conf, subnet_file_hint=hint("198.19.0.1/30"))
        with pytest.raises(SubnetsExhausted):
            taken_by_hint.acquire(fake_clock())
    finally:
        s.close()
    assert V4("198.19.0.0/30") not in got and len(got) == 3


def test_dual_stack_picks_both_families_together(store, fake_clock):
    conf = net_conf("198.19.0.0/16", 24, ipv6_network="fd00:198::/48", ipv6_subnet_len=64)
    lease = manager(store, 1, conf=conf).acquire(fake_clock())
    assert lease.subnet is not None and lease.ipv6_subnet is not None
    assert lease.ipv6_subnet.prefixlen == 64 and lease.ipv6_subnet.subnet_of(V6("fd00:198::/48"))
    assert lease.ipv6_subnet != V6("fd00:198::/64")
    assert "&" in lease.key and [x.key for x in store.list().leases] == [lease.key]
    # A second dual-stack node gets a different pair; the same node gets its pair back.
    other = manager(store, 2, conf=conf, seed=1).acquire(fake_clock())
    assert other.subnet != lease.subnet and other.ipv6_subnet != lease.ipv6_subnet
    assert manager(store, 1, conf=conf, seed=5).acquire(fake_clock()).key == lease.key


def test_dual_stack_hint_needs_both_families(store, fake_clock):
    conf = net_conf("198.19.0.0/16", 24, ipv6_network="fd00:198::/48", ipv6_subnet_len=64)
    h = hint("198.19.77.1/24", "fd00:198:0:77::1/64")
    lease = manager(store, 1, conf=conf, subnet_file_hint=h).acquire(fake_clock())
    assert (lease.subnet, lease.ipv6_subnet) == (V4("198.19.77.0/24"), V6("fd00:198:0:77::/64"))
    v4_only = hint("198.19.78.1/24")
    lease2 = manager(store, 2, conf=conf, subnet_file_hint=v4_only).acquire(fake_clock())
    assert lease2.subnet != V4("198.19.78.0/24")  # half a hint is no hint


def test_ipv6_only(store, fake_clock):
    conf = net_conf(None, ipv6_network="fd00:198::/56", ipv6_subnet_len=64)
    assert not conf.enable_ipv4
    attrs = LeaseAttrs(public_ipv6=ipaddress.IPv6Address("fd00:198:ffff::1"), backend_type="vxlan")
    lease = LeaseManager(store, conf, attrs, ttl=TTL, renew_margin=MARGIN).acquire(fake_clock())
    assert lease.subnet is None and lease.ipv6_subnet is not None
    again = LeaseManager(store, conf, attrs, ttl=TTL, renew_margin=MARGIN).acquire(fake_clock())
    assert again.key == lease.key  # reuse by PublicIPv6


def test_assigned_subnet_is_used_without_choice(store, fake_clock):
    kube = AssignedStore(store, V4("198.19.99.0/24"))
    lease = manager(kube, 1, subnet_file_hint=hint("198.19.77.1/24")).acquire(fake_clock())
    assert lease.subnet == V4("198.19.99.0/24")
    again = manager(kube, 1).acquire(fake_clock())
    assert again.key == lease.key and again.revision > lease.revision  # renewed, not re-created


def test_assigned_subnet_outside_network_is_an_error(store, fake_clock):
    kube = AssignedStore(store, V4("198.18.99.0/24"))
    with pytest.raises(StoreError, match=r"outside Network 198\.19\.0\.0/16"):
        manager(kube, 1).acquire(fake_clock())


def test_renew_margin_must_be_below_ttl(store):
    with pytest.raises(ValueError):
        manager(store, 1, ttl=100, renew_margin=100)


# -- keeping the lease -----------------------------------------------------------------------------------


def test_renew_due_and_renew(store, fake_clock):
    m = manager(store, 1)
    assert m.renew_due(fake_clock()) == fake_clock()  # nothing held yet: now
    lease = m.acquire(fake_clock())
    assert m.renew_due(fake_clock()) == lease.expiration - MARGIN
    fake_clock.advance(TTL - MARGIN)
    renewed = m.renew(fake_clock())
    assert renewed.key == lease.key and renewed.expiration == fake_clock() + TTL
    assert m.renew_due(fake_clock()) == renewed.expiration - MARGIN
    fake_clock.advance(TTL - 1)  # past the first expiry: still ours thanks to the renewal
    assert [x.key for x in store.list().leases] == [lease.key]


def test_reservation_renews_on_the_ttl_rhythm(store, fake_clock):
    store.reserve(V4("198.19.200.0/24"), None, node_attrs(1))
    m = manager(store, 1)
    m.acquire(fake_clock())
    assert m.renew_due(fake_clock()) == fake_clock() + TTL - MARGIN


def test_deleted_lease_is_reacquired_and_logged(store, fake_clock, caplog):
    m = manager(store, 1)
    lease = m.acquire(fake_clock())
    store.delete(store.list().leases[0])
    with caplog.at_level(logging.WARNING, logger="udpflannel.lease.manager"):
        new = m.renew(fake_clock())
    assert "lease lost, re-acquiring" in caplog.text
    assert [x.key for x in store.list().leases] == [new.key]
    assert new.key == lease.key  # still free: the same subnet again, so the node's pods keep their addresses
    assert new.revision > lease.revision and m.lease == new and not m.lost


def test_expired_lease_taken_by_another_node_is_reacquired_elsewhere(store, fake_clock, caplog):
    m = manager(store, 1)
    lease = m.acquire(fake_clock())
    fake_clock.advance(TTL + 1)
    store.create(lease.subnet, None, node_attrs(2), TTL)  # someone took the expired subnet
    with caplog.at_level(logging.WARNING, logger="udpflannel.lease.manager"):
        new = m.renew(fake_clock())
    assert "lease lost, re-acquiring" in caplog.text
    assert new.subnet != lease.subnet and new.attrs.public_ip == node_attrs(1).public_ip


def test_watch_notices_our_lease_removed(store, fake_clock, caplog):
    m = manager(store, 1)
    m.acquire(fake_clock())
    assert m.watch_peers(timeout=0) == []  # the first call lists; no peers yet
    store.delete(store.list().leases[0])
    with caplog.at_level(logging.WARNING, logger="udpflannel.lease.manager"):
        assert m.watch_peers(timeout=1) == []  # our own lease is never a peer event
        assert m.lost
        assert m.renew_due(fake_clock()) == fake_clock()
        new = m.renew(fake_clock())
    assert "lease lost, re-acquiring" in caplog.text
    assert not m.lost and [x.key for x in store.list().leases] == [new.key]


def test_release_deletes_our_lease(store, fake_clock):
    m = manager(store, 1)
    m.acquire(fake_clock())
    m.release()
    assert store.list().leases == [] and m.lease is None
    m.release()  # nothing held: no error


def test_release_never_deletes_a_lease_taken_by_another_node(store, fake_clock):
    m = manager(store, 1)
    lease = m.acquire(fake_clock())
    fake_clock.advance(TTL + 1)
    other = store.create(lease.subnet, None, node_attrs(2), TTL)
    m.release()
    assert [(x.key, x.revision) for x in store.list().leases] == [(other.key, other.revision)]


# -- peers -----------------------------------------------------------------------------------------------


def test_watch_peers_lists_then_follows(store, fake_clock):
    m = manager(store, 1)
    mine = m.acquire(fake_clock())
    p2 = manager(store, 2, seed=2).acquire(fake_clock())
    first = m.watch_peers(timeout=0)
    assert [(e.type, e.lease.key) for e in first] == [(EventType.ADDED, p2.key)]
    p3 = manager(store, 3, seed=3).acquire(fake_clock())
    m.renew(fake_clock())  # our own renewal: not an event
    store.renew(p2, node_attrs(2), TTL)  # a plain renewal of a peer: nothing changed
    assert [(e.type, e.lease.key) for e in m.watch_peers(timeout=1)] == [(EventType.ADDED, p3.key)]
    store.delete(store.list().leases[[x.key for x in store.list().leases].index(p3.key)])
    assert [(e.type, e.lease.key) for e in m.watch_peers(timeout=1)] == [(EventType.REMOVED, p3.key)]
    assert [x.key for x in m.peers()] == [p2.key]
    assert mine.key not in [x.key for x in m.peers()]


def test_watch_peers_relists_after_compaction(store, fake_clock):
    m = manager(store, 1)
    m.acquire(fake_clock())
    p2 = manager(store, 2, seed=2).acquire(fake_clock())
    assert len(m.watch_peers(timeout=0)) == 1
    p3 = manager(store, 3, seed=3).acquire(fake_clock())
    store.delete(store.list().leases[[x.key for x in store.list().leases].index(p2.key)])
    store.compact(0)
    events = m.watch_peers(timeout=0)  # Compacted inside: re-list and diff
    assert sorted((e.type.value, e.lease.key) for e in events) == [("added", p3.key), ("removed", p2.key)]
    assert not m.lost


def test_watch_peers_sees_expiry_as_removal(store, fake_clock):
    m = manager(store, 1)
    m.acquire(fake_clock())
    p2 = manager(store, 2, seed=2)
    p2_lease = p2.acquire(fake_clock())
    m.watch_peers(timeout=0)
    fake_clock.advance(TTL / 2)
    m.renew(fake_clock())
    fake_clock.advance(TTL / 2 + 1)  # p2 never renewed
    events = m.watch_peers(timeout=1)
    assert [(e.type, e.lease.key) for e in events if e.type is EventType.REMOVED] == [
        (EventType.REMOVED, p2_lease.key)
    ]
