"""Hypothesis properties of LeaseManager over SqliteStore with a fake clock.

Random sequences of acquire / renew / time passing / admin deletes / releases / peer watches, on a roomy
range and on tiny ones that run out: allocations never overlap, stay within SubnetMin..SubnetMax, never use
the first subnet, every node holds at most one lease, and "exhausted" is only ever said when it is true.
"""

from __future__ import annotations

import ipaddress
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from lease_helpers import FakeClock, net_conf, node_attrs

from udpflannel.config import NetworkConfig
from udpflannel.lease.manager import LeaseManager, SubnetsExhausted
from udpflannel.lease.model import Lease
from udpflannel.lease.sqlite import SqliteStore

TTL = 1000.0
MARGIN = 100.0
NODES = range(1, 7)

CONFIGS = {
    # 21 allocatable subnets for 6 nodes: never exhausted.
    "roomy": net_conf("198.19.0.0/16", 24, subnet_min="198.19.10.0/24", subnet_max="198.19.30.0/24"),
    # 3 allocatable subnets (the first of 4 is never handed out) for 6 nodes.
    "tiny": net_conf("198.19.0.0/28", 30),
    # Dual stack, v4 is the scarce family (3 subnets), v6 has 15.
    "dual": net_conf("198.19.0.0/26", 28, ipv6_network="fd00:198::/60", ipv6_subnet_len=64),
    # Dual stack, v6 is the scarce family.
    "dual6": net_conf("198.19.0.0/24", 28, ipv6_network="fd00:198::/62", ipv6_subnet_len=64),
}

node = st.sampled_from(list(NODES))
op = st.one_of(
    # acquire twice in the list: more nodes competing, so the tiny ranges run out in many examples
    st.tuples(st.just("acquire"), node),
    st.tuples(st.just("acquire"), node),
    st.tuples(st.just("renew"), node),
    st.tuples(st.just("advance"), st.sampled_from([1.0, TTL / 2, TTL - MARGIN, TTL + 1])),
    st.tuples(st.just("admin_delete"), st.integers(0, 20)),
    st.tuples(st.just("release"), node),
    st.tuples(st.just("watch"), node),
)


def capacity(network, subnet_len: int, smin, smax) -> int:
    size = 1 << (network.max_prefixlen - subnet_len)
    first = max(int(smin.network_address), int(network.network_address) + size)
    return (int(smax.network_address) - first) // size + 1


def families(conf: NetworkConfig):
    if conf.enable_ipv4:
        yield "subnet", conf.network, conf.subnet_len, conf.subnet_min, conf.subnet_max
    if conf.enable_ipv6:
        yield (
            "ipv6_subnet",
            conf.ipv6_network,
            conf.ipv6_subnet_len,
            conf.ipv6_subnet_min,
            conf.ipv6_subnet_max,
        )


def check_store(conf: NetworkConfig, leases: list[Lease]) -> None:
    owners = [x.attrs.public_ip for x in leases]
    assert len(owners) == len(set(owners)), "a node holds two leases"
    for attr, network, subnet_len, smin, smax in families(conf):
        nets = [getattr(x, attr) for x in leases]
        assert all(net is not None for net in nets), f"lease without {attr}"
        for i, net in enumerate(nets):
            assert net.prefixlen == subnet_len
            assert net.subnet_of(network)
            assert net.network_address != network.network_address, "first subnet handed out"
            assert smin.network_address <= net.network_address <= smax.network_address
            for other in nets[i + 1 :]:
                assert not net.overlaps(other), f"{net} overlaps {other}"


def check_exhausted(conf: NetworkConfig, leases: list[Lease]) -> None:
    """SubnetsExhausted is honest: some family really has no free subnet left."""
    full = [
        len({getattr(x, attr) for x in leases}) == capacity(network, subnet_len, smin, smax)
        for attr, network, subnet_len, smin, smax in families(conf)
    ]
    assert any(full), f"exhausted with only {len(leases)} leases"


def run_ops(conf: NetworkConfig, ops: list[tuple[str, object]], db: Path) -> None:
    clock = FakeClock()
    store = SqliteStore(db, clock=clock)
    managers: dict[int, LeaseManager] = {}
    rng = random.Random(7)

    def mgr(n: int) -> LeaseManager:
        if n not in managers:
            managers[n] = LeaseManager(
                store, conf, node_attrs(n), ttl=TTL, renew_margin=MARGIN, rng=random.Random(n)
            )
        return managers[n]

    try:
        for name, arg in ops:
            fresh: LeaseManager | None = None  # a manager whose lease must be in the store right now
            if name in ("acquire", "renew"):
                m = mgr(arg)  # type: ignore[arg-type]
                try:
                    if name == "acquire":
                        m.acquire(clock())
                    else:
                        m.renew(clock())
                    fresh = m
                except SubnetsExhausted:
                    event("exhausted")  # shown by --hypothesis-show-statistics: the tiny ranges get here
                    check_exhausted(conf, store.list().leases)
            elif name == "advance":
                clock.advance(arg)  # type: ignore[arg-type]
            elif name == "admin_delete":
                leases = store.list().leases
                if leases:
                    store.delete(leases[int(arg) % len(leases)])  # type: ignore[call-overload]
            elif name == "release":
                mgr(arg).release()  # type: ignore[arg-type]
            elif name == "watch":
                m = mgr(arg)  # type: ignore[arg-type]
                m.watch_peers(timeout=0)
                m.watch_peers(timeout=0)
                own = m.lease.key if m.lease else None
                assert own not in {x.key for x in m.peers()}

            leases = store.list().leases
            check_store(conf, leases)
            if fresh is not None:
                assert fresh.lease is not None and not fresh.lost
                held = {x.key: x for x in leases}
                assert held[fresh.lease.key].revision == fresh.lease.revision
                assert held[fresh.lease.key].attrs == fresh.lease.attrs
        # Whatever happened, every node can still end up with a lease or an honest "exhausted".
        for n in rng.sample(list(NODES), len(NODES)):
            try:
                mgr(n).renew(clock())
            except SubnetsExhausted:
                check_exhausted(conf, store.list().leases)
        check_store(conf, store.list().leases)
    finally:
        store.close()


@pytest.mark.parametrize("conf_name", sorted(CONFIGS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=25))
# Found by this test: releasing a lease that expired and was taken by another node must not fail.
@example(ops=[("acquire", 3), ("advance", TTL + 1), ("acquire", 1), ("release", 3)])
def test_allocation_properties(conf_name: str, ops):
    with tempfile.TemporaryDirectory(prefix="udpflannel-lease-") as tmp:
        run_ops(CONFIGS[conf_name], ops, Path(tmp) / "leases.db")


def test_roomy_range_holds_exactly_its_capacity():
    conf = CONFIGS["roomy"]
    assert capacity(conf.network, conf.subnet_len, conf.subnet_min, conf.subnet_max) == 21
    tiny = CONFIGS["tiny"]
    assert capacity(tiny.network, tiny.subnet_len, tiny.subnet_min, tiny.subnet_max) == 3
    with tempfile.TemporaryDirectory(prefix="udpflannel-lease-") as tmp:
        clock = FakeClock()
        store = SqliteStore(Path(tmp) / "l.db", clock=clock)
        try:
            subnets = set()
            for n in range(1, 22):
                m = LeaseManager(
                    store, conf, node_attrs(n), ttl=TTL, renew_margin=MARGIN, rng=random.Random(n)
                )
                subnets.add(m.acquire(clock()).subnet)
            assert len(subnets) == 21
            assert min(subnets) == ipaddress.IPv4Network("198.19.10.0/24")
            assert max(subnets) == ipaddress.IPv4Network("198.19.30.0/24")
            with pytest.raises(SubnetsExhausted):
                LeaseManager(store, conf, node_attrs(22), ttl=TTL, renew_margin=MARGIN).acquire(clock())
        finally:
            store.close()
