"""EtcdStore on a real etcd 3.4: flannel's layout, CAS, reservations, expiry, watch, compaction, restart."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from etcd_server import EtcdServer, etcd_available

from udpflannel.lab.netns import SERVICE_ADDR
from udpflannel.lease.etcd import EtcdStore
from udpflannel.lease.model import EventType, LeaseAttrs
from udpflannel.lease.store import Compacted, Conflict, NotFound, StoreError

# etcd, the API double and their clients run in a namespace of the module's own, on its loopback
# (tests/conftest.py private_net): none of it touches the machine's network.
pytestmark = [
    pytest.mark.usefixtures("private_net"),
    pytest.mark.skipif(not etcd_available(), reason="needs /usr/bin/etcd (apt-get install etcd-server)"),
]

NET1 = ipaddress.IPv4Network("198.19.1.0/24")
NET2 = ipaddress.IPv4Network("198.19.2.0/24")
NET6 = ipaddress.IPv6Network("fd00:198:0:1::/64")
ATTRS_A = LeaseAttrs(
    public_ip=ipaddress.IPv4Address("198.18.0.1"),
    backend_type="vxlan",
    backend_data={"VNI": 1, "VtepMAC": "02:00:00:00:00:01"},
)
ATTRS_B = LeaseAttrs(public_ip=ipaddress.IPv4Address("198.18.0.2"))
# Exactly what flanneld v0.2x writes (pkg/subnet/etcd/registry.go marshals LeaseAttrs with PublicIPv6 null).
FLANNELD_VALUE = (
    '{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}'
)


def etcd_call(endpoint: str, path: str, payload: dict) -> dict:
    """Raw gateway call, independent of the code under test."""
    req = urllib.request.Request(
        f"{endpoint}/v3/{path}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def raw_put(endpoint: str, key: str, value: str, lease: int = 0) -> int:
    payload = {
        "key": base64.b64encode(key.encode()).decode(),
        "value": base64.b64encode(value.encode()).decode(),
    }
    if lease:
        payload["lease"] = lease
    return int(etcd_call(endpoint, "kv/put", payload)["header"]["revision"])


def raw_get(endpoint: str, key: str) -> dict | None:
    kvs = etcd_call(endpoint, "kv/range", {"key": base64.b64encode(key.encode()).decode()}).get("kvs")
    return kvs[0] if kvs else None


@pytest.fixture(scope="module")
def etcd(private_net: str) -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """Each test gets its own key space on the shared server."""
    return f"/test-{uuid.uuid4().hex[:8]}/network"


@pytest.fixture
def store(etcd: EtcdServer, prefix: str) -> Iterator[EtcdStore]:
    s = EtcdStore([etcd.endpoint], prefix=prefix, retry_for=5)
    try:
        yield s
    finally:
        s.close()


def test_config_comes_from_prefix_config(etcd: EtcdServer, store: EtcdStore, prefix: str) -> None:
    assert store.network_config() is None
    conf = '{"Network":"198.19.0.0/16","Backend":{"Type":"vxlan"}}'
    raw_put(etcd.endpoint, f"{prefix}/config", conf)
    assert store.network_config() == conf
    assert store.assigned_subnets() is None


def test_create_writes_flannel_layout_with_an_etcd_lease(
    etcd: EtcdServer, store: EtcdStore, prefix: str
) -> None:
    before = time.time()
    lease = store.create(NET1, None, ATTRS_A, ttl=60)
    kv = raw_get(etcd.endpoint, f"{prefix}/subnets/198.19.1.0-24")
    assert kv is not None
    assert base64.b64decode(kv["value"]).decode() == (
        '{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}'
    )  # flanneld's bytes (FLANNELD_VALUE's layout)
    assert int(kv["lease"]) != 0
    ttl = etcd_call(etcd.endpoint, "kv/lease/timetolive", {"ID": int(kv["lease"])})
    assert int(ttl["grantedTTL"]) == 60
    assert lease.revision == int(kv["mod_revision"])
    assert lease.expiration is not None and before + 59 <= lease.expiration <= time.time() + 61
    snap = store.list()
    assert snap.revision >= lease.revision
    assert [(x.subnet, x.attrs, x.revision) for x in snap.leases] == [(NET1, ATTRS_A, lease.revision)]


def test_create_is_refused_when_the_key_exists(store: EtcdStore) -> None:
    store.create(NET1, None, ATTRS_A, ttl=60)
    with pytest.raises(Conflict):
        store.create(NET1, None, ATTRS_B, ttl=60)
    assert [x.attrs for x in store.list().leases] == [ATTRS_A]


def test_dual_stack_key(etcd: EtcdServer, store: EtcdStore, prefix: str) -> None:
    store.create(NET1, NET6, ATTRS_A, ttl=60)
    assert raw_get(etcd.endpoint, f"{prefix}/subnets/198.19.1.0-24&fd00:198:0:1::-64") is not None
    (lease,) = store.list().leases
    assert (lease.subnet, lease.ipv6_subnet) == (NET1, NET6)


def test_renew_is_compare_and_swap(store: EtcdStore) -> None:
    lease = store.create(NET1, None, ATTRS_A, ttl=60)
    renewed = store.renew(lease, ATTRS_B, ttl=120)
    assert renewed.revision > lease.revision
    assert renewed.expiration is not None and renewed.expiration > lease.expiration + 30
    with pytest.raises(Conflict):
        store.renew(lease, ATTRS_A, ttl=60)  # stale revision
    (listed,) = store.list().leases
    assert (listed.attrs, listed.revision) == (ATTRS_B, renewed.revision)
    assert listed.expiration is not None and listed.expiration > time.time() + 100


def test_renew_replaces_the_etcd_lease(etcd: EtcdServer, store: EtcdStore, prefix: str) -> None:
    lease = store.create(NET1, None, ATTRS_A, ttl=60)
    old_id = int(raw_get(etcd.endpoint, f"{prefix}/subnets/198.19.1.0-24")["lease"])
    store.renew(lease, ATTRS_A, ttl=90)
    new_id = int(raw_get(etcd.endpoint, f"{prefix}/subnets/198.19.1.0-24")["lease"])
    assert new_id != old_id
    assert int(etcd_call(etcd.endpoint, "kv/lease/timetolive", {"ID": old_id})["TTL"]) == -1  # revoked


def test_delete_and_not_found(store: EtcdStore) -> None:
    lease = store.create(NET1, None, ATTRS_A, ttl=60)
    renewed = store.renew(lease, ATTRS_A, ttl=60)
    with pytest.raises(Conflict):
        store.delete(lease)
    store.delete(renewed)
    assert store.list().leases == []
    with pytest.raises(NotFound):
        store.delete(renewed)
    with pytest.raises(NotFound):
        store.renew(renewed, ATTRS_A, ttl=60)


def test_reservation_never_expires_and_only_its_public_ip_may_use_it(store: EtcdStore) -> None:
    reserved = store.reserve(NET2, None, ATTRS_B)
    assert reserved.is_reservation
    with pytest.raises(Conflict):
        store.create(NET2, None, ATTRS_A, ttl=60)
    with pytest.raises(Conflict):
        store.reserve(NET2, None, ATTRS_A)
    with pytest.raises(Conflict):
        store.renew(reserved, ATTRS_A, ttl=60)  # someone else's PublicIP
    attrs = LeaseAttrs(public_ip=ATTRS_B.public_ip, backend_type="udp")
    taken = store.renew(reserved, attrs, ttl=60)
    assert taken.is_reservation
    (listed,) = store.list().leases
    assert listed.is_reservation and listed.attrs == attrs


def test_a_lease_written_by_flanneld_reads_as_a_peer(etcd: EtcdServer, store: EtcdStore, prefix: str) -> None:
    grant = etcd_call(etcd.endpoint, "lease/grant", {"TTL": 300})
    raw_put(etcd.endpoint, f"{prefix}/subnets/198.19.9.0-24", FLANNELD_VALUE, lease=int(grant["ID"]))
    (lease,) = store.list().leases
    assert lease.subnet == ipaddress.IPv4Network("198.19.9.0/24")
    assert lease.attrs.public_ip == ipaddress.IPv4Address("198.18.0.9")
    assert lease.attrs.public_ipv6 is None
    assert lease.attrs.backend_type == "vxlan"
    assert lease.attrs.backend_data == {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}
    assert lease.expiration is not None and lease.expiration > time.time() + 290


def test_malformed_records_are_counted_drops(etcd: EtcdServer, store: EtcdStore, prefix: str) -> None:
    raw_put(etcd.endpoint, f"{prefix}/subnets/not-a-subnet", "{}")
    raw_put(etcd.endpoint, f"{prefix}/subnets/198.19.5.0-24", "{not json")
    raw_put(etcd.endpoint, f"{prefix}/subnets/198.19.6.0-24", '{"PublicIP":"banana"}')
    store.create(NET1, None, ATTRS_A, ttl=60)
    assert [x.subnet for x in store.list().leases] == [NET1]
    assert store.drops == {"bad_key": 1, "bad_value": 2}


def test_watch_sees_creates_renews_and_deletes_in_order(
    etcd: EtcdServer, store: EtcdStore, prefix: str
) -> None:
    other = EtcdStore([etcd.endpoint], prefix=prefix)
    try:
        rev = store.list().revision
        lease = other.create(NET1, None, ATTRS_A, ttl=60)
        renewed = other.renew(lease, ATTRS_B, ttl=60)
        other.delete(renewed)
        seen = []
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            batch = store.watch(rev, timeout=2)
            seen += batch
            rev = batch[-1].revision if batch else rev
        assert [(e.type, e.lease.subnet, e.lease.attrs) for e in seen] == [
            (EventType.ADDED, NET1, ATTRS_A),
            (EventType.ADDED, NET1, ATTRS_B),
            (EventType.REMOVED, NET1, ATTRS_B),
        ]
        assert [e.revision for e in seen] == [lease.revision, renewed.revision, renewed.revision + 1]
    finally:
        other.close()


def test_watch_times_out_empty(store: EtcdStore) -> None:
    rev = store.list().revision
    t0 = time.monotonic()
    assert store.watch(rev, timeout=0.5) == []
    assert 0.4 <= time.monotonic() - t0 < 2.0


def test_expiry_is_a_removed_event(store: EtcdStore) -> None:
    rev = store.list().revision
    lease = store.create(NET1, None, ATTRS_A, ttl=1)
    events = []
    deadline = time.monotonic() + 10
    while not any(e.type is EventType.REMOVED for e in events) and time.monotonic() < deadline:
        batch = store.watch(rev, timeout=1)
        events += batch
        rev = batch[-1].revision if batch else rev
    assert [e.type for e in events] == [EventType.ADDED, EventType.REMOVED]
    assert events[1].lease.subnet == NET1 and events[1].revision > lease.revision
    assert store.list().leases == []


def test_compaction_behind_a_watcher_raises_compacted_then_relist_resumes(
    etcd: EtcdServer, store: EtcdStore
) -> None:
    rev = store.list().revision
    lease = store.create(NET1, None, ATTRS_A, ttl=60)
    for _ in range(3):
        lease = store.renew(lease, ATTRS_A, ttl=60)
    etcd_call(etcd.endpoint, "kv/compaction", {"revision": lease.revision, "physical": True})
    with pytest.raises(Compacted):
        store.watch(rev, timeout=2)
    snap = store.list()
    assert [x.revision for x in snap.leases] == [lease.revision]
    store.create(NET2, None, ATTRS_B, ttl=60)
    (event,) = store.watch(snap.revision, timeout=2)
    assert (event.type, event.lease.subnet) == (EventType.ADDED, NET2)


def test_compaction_while_a_watch_is_open(etcd: EtcdServer, store: EtcdStore, prefix: str) -> None:
    """A watch already past the compacted revision keeps working; the store does not invent a Compacted."""
    rev = store.list().revision
    result: list = []
    watcher = threading.Thread(target=lambda: result.append(store.watch(rev, timeout=5)))
    watcher.start()
    time.sleep(0.3)
    etcd_call(etcd.endpoint, "kv/compaction", {"revision": rev, "physical": True})
    raw_put(etcd.endpoint, f"{prefix}/subnets/198.19.3.0-24", ATTRS_B.dumps())
    watcher.join(10)
    assert [(e.type, str(e.lease.subnet)) for e in result[0]] == [(EventType.ADDED, "198.19.3.0/24")]


def test_two_stores_racing_for_one_subnet_exactly_one_wins(etcd: EtcdServer, prefix: str) -> None:
    stores = [EtcdStore([etcd.endpoint], prefix=prefix) for _ in range(4)]
    try:
        for round_ in range(5):
            net = ipaddress.IPv4Network(f"198.19.{10 + round_}.0/24")
            barrier = threading.Barrier(len(stores))
            outcome: list[str] = []

            def race(s: EtcdStore, net=net, barrier=barrier, outcome=outcome) -> None:
                barrier.wait()
                try:
                    s.create(net, None, ATTRS_A, ttl=60)
                    outcome.append("won")
                except Conflict:
                    outcome.append("lost")

            threads = [threading.Thread(target=race, args=(s,)) for s in stores]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert sorted(outcome) == ["lost", "lost", "lost", "won"]
        assert len(stores[0].list().leases) == 5
    finally:
        for s in stores:
            s.close()


def test_etcd_killed_and_restarted_during_a_watch() -> None:
    """Same data dir: the lease survives, the blocked watch reconnects, and no event is lost."""
    with EtcdServer() as server:
        holder = EtcdStore([server.endpoint], retry_for=20)
        watcher = EtcdStore([server.endpoint], retry_for=20)
        try:
            rev = watcher.list().revision
            lease = holder.create(NET1, None, ATTRS_A, ttl=120)
            first = watcher.watch(rev, timeout=5)
            assert [e.lease.subnet for e in first] == [NET1]
            rev = first[-1].revision
            # An event the watcher has not read yet when etcd dies.
            other = holder.create(NET2, None, ATTRS_B, ttl=120)

            result: list = []
            t = threading.Thread(target=lambda: result.append(watcher.watch(rev, timeout=15)))
            server.kill()
            t.start()
            time.sleep(1.0)  # the watch is now retrying against a dead endpoint
            server.start()
            t.join(20)
            assert [(e.type, e.lease.subnet, e.revision) for e in result[0]] == [
                (EventType.ADDED, NET2, other.revision)
            ]

            # A watch blocked while etcd dies sees what happens after the restart.
            result.clear()
            t = threading.Thread(target=lambda: result.append(watcher.watch(other.revision, timeout=15)))
            t.start()
            time.sleep(0.3)
            server.kill()
            time.sleep(0.5)
            server.start()
            kept = holder.renew(lease, ATTRS_A, ttl=120)  # our lease is still ours after the restart
            t.join(20)
            assert [(e.type, e.lease.subnet, e.revision) for e in result[0]] == [
                (EventType.ADDED, NET1, kept.revision)
            ]
            assert {x.subnet for x in watcher.list().leases} == {NET1, NET2}
        finally:
            holder.close()
            watcher.close()


def test_two_managers_racing_for_the_last_free_subnet(etcd: EtcdServer, prefix: str) -> None:
    """One wins the last subnet; the loser's create conflicts, it re-lists, and finds nothing left."""
    from udpflannel.config import parse_net_conf
    from udpflannel.lease.manager import LeaseManager, SubnetsExhausted

    conf = parse_net_conf(
        '{"Network": "198.19.0.0/16", "SubnetLen": 24, "SubnetMin": "198.19.1.0", "SubnetMax": "198.19.2.0"}'
    )
    for round_ in range(3):
        round_prefix = f"{prefix}-{round_}"
        stores = [EtcdStore([etcd.endpoint], prefix=round_prefix) for _ in range(3)]
        try:
            stores[0].create(NET1, None, LeaseAttrs(public_ip=ipaddress.IPv4Address("198.18.0.100")), ttl=60)
            racers = [
                LeaseManager(
                    s,
                    conf,
                    LeaseAttrs(public_ip=ipaddress.IPv4Address(f"198.18.0.{n}")),
                    ttl=60,
                    renew_margin=10,
                )
                for n, s in enumerate(stores[1:], start=1)
            ]
            barrier = threading.Barrier(len(racers))
            outcome: dict[int, object] = {}

            def race(i: int, manager: LeaseManager, barrier=barrier, outcome=outcome) -> None:
                barrier.wait()
                try:
                    outcome[i] = manager.acquire(time.time()).subnet
                except SubnetsExhausted as exc:
                    outcome[i] = exc

            threads = [threading.Thread(target=race, args=(i, m)) for i, m in enumerate(racers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            won = [v for v in outcome.values() if v == NET2]
            lost = [v for v in outcome.values() if isinstance(v, SubnetsExhausted)]
            assert (len(won), len(lost)) == (1, 1), outcome
            assert sorted(str(x.subnet) for x in stores[0].list().leases) == [str(NET1), str(NET2)]
        finally:
            for s in stores:
                s.close()


def test_failover_to_the_next_endpoint(etcd: EtcdServer, prefix: str) -> None:
    """A dead first endpoint (a closed local port) costs a retry, not an error."""
    store = EtcdStore([f"http://{SERVICE_ADDR}:1", etcd.endpoint], prefix=prefix, retry_for=5)
    try:
        lease = store.create(NET1, None, ATTRS_A, ttl=60)
        assert [x.revision for x in store.list().leases] == [lease.revision]
    finally:
        store.close()


def test_unreachable_etcd_is_a_store_error_naming_the_endpoint(prefix: str) -> None:
    store = EtcdStore([f"http://{SERVICE_ADDR}:1"], prefix=prefix, retry_for=0.3)
    try:
        with pytest.raises(StoreError, match=rf"unreachable.*{re.escape(SERVICE_ADDR)}:1"):
            store.list()
    finally:
        store.close()


def test_username_password_and_token_expiry() -> None:
    """etcd auth: the store logs in, and logs in again when its token expires (1 s here)."""
    with EtcdServer(extra_args=["--auth-token-ttl=1"]) as server:
        for path, payload in (
            ("auth/user/add", {"name": "root", "password": "rootpw"}),
            ("auth/role/add", {"name": "root"}),
            ("auth/user/grant", {"user": "root", "role": "root"}),
            ("auth/enable", {}),
        ):
            etcd_call(server.endpoint, path, payload)
        anonymous = EtcdStore([server.endpoint], retry_for=1)
        store = EtcdStore([server.endpoint], username="root", password="rootpw", retry_for=5)
        wrong = EtcdStore([server.endpoint], username="root", password="nope", retry_for=5)
        try:
            with pytest.raises(StoreError, match="user name is empty"):
                anonymous.list()
            with pytest.raises(StoreError, match="authentication failed"):
                wrong.list()
            rev = store.list().revision
            lease = store.create(NET1, None, ATTRS_A, ttl=60)
            time.sleep(2.5)  # the token has expired
            (event,) = store.watch(rev, timeout=3)
            assert event.revision == lease.revision
            time.sleep(2.5)
            assert [x.subnet for x in store.list().leases] == [NET1]
        finally:
            for s in (anonymous, store, wrong):
                s.close()


def test_tls_with_client_certificates(tmp_path) -> None:
    """--etcd-cafile/--etcd-certfile/--etcd-keyfile: https with a client certificate, refused without one."""
    from kube_wire import write_self_signed_cert

    cert, key = write_self_signed_cert(str(tmp_path), SERVICE_ADDR)
    with EtcdServer(tls=(cert, key)) as server:
        assert server.endpoint.startswith("https://")
        store = EtcdStore([server.endpoint], cafile=cert, certfile=cert, keyfile=key, retry_for=5)
        no_cert = EtcdStore([server.endpoint], cafile=cert, retry_for=0.5)
        try:
            rev = store.list().revision
            lease = store.create(NET1, None, ATTRS_A, ttl=60)
            (event,) = store.watch(rev, timeout=3)
            assert event.revision == lease.revision
            with pytest.raises(StoreError):
                no_cert.list()
        finally:
            store.close()
            no_cert.close()
