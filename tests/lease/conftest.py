"""Fixtures for the lease tests: `store_factory`, parametrised over every Store implementation.

To add a store, write a factory `(tmp_path) -> contextmanager yielding a StoreBackend` and add it to
STORE_BACKENDS. The contract suite (test_store_contract.py) then runs against it unchanged.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from etcd_server import EtcdServer, etcd_available
from lease_helpers import ALL_CAPS, CAP_RESERVE, FakeClock

from udpflannel.lease.sqlite import SqliteStore
from udpflannel.lease.store import Store


@dataclass
class StoreBackend:
    """One running store. `open()` gives a new client of it (another agent); all clients share one clock.

    advance(seconds) moves time for TTLs (a fake clock, or a real sleep for stores that expire on their own);
    compact(keep) makes all but the last `keep` revisions unavailable to watch().
    """

    open: Callable[[], Store]
    advance: Callable[[float], None]
    compact: Callable[[int], None] | None = None
    caps: frozenset[str] = ALL_CAPS
    unsupported: dict[str, str] = field(default_factory=dict)  # contract test name -> why this store skips it


@contextlib.contextmanager
def sqlite_backend(tmp_path: Path) -> Iterator[StoreBackend]:
    clock = FakeClock()
    path = tmp_path / "leases" / "leases.db"
    opened: list[SqliteStore] = []

    def open_store() -> SqliteStore:
        store = SqliteStore(path, clock=clock)
        opened.append(store)
        return store

    def compact(keep: int) -> None:
        admin = open_store()
        admin.compact(keep)

    try:
        yield StoreBackend(open=open_store, advance=clock.advance, compact=compact)
    finally:
        for store in opened:
            store.close()


@contextlib.contextmanager
def etcd_backend(tmp_path: Path) -> Iterator[StoreBackend]:
    """A real etcd per test (about 0.5 s to start); etcd expires leases itself, so time moves by sleeping."""
    if not etcd_available():
        pytest.skip("needs /usr/bin/etcd (apt-get install etcd-server)")
    from udpflannel.lease.etcd import EtcdStore

    opened: list[EtcdStore] = []

    def open_store() -> EtcdStore:
        store = EtcdStore([server.endpoint], retry_for=5)
        opened.append(store)
        return store

    def compact(keep: int) -> None:
        admin = open_store()
        admin.compact(admin.list().revision - keep + 1)

    with EtcdServer(data_dir=str(tmp_path / "etcd")) as server:
        try:
            yield StoreBackend(open=open_store, advance=time.sleep, compact=compact)
        finally:
            for store in opened:
                store.close()


# Kubernetes has no lease expiry, no per-lease address families and no write for an unchanged renewal.
KUBE_UNSUPPORTED = {
    "test_dual_stack_lease_round_trip": "address families are a store setting (EnableIPv6), not per lease",
    "test_lease_expires_after_ttl": "Kubernetes has no lease expiry",
    "test_expiry_is_a_removed_event": "Kubernetes has no lease expiry",
    "test_renew_extends_the_lease": "Kubernetes has no lease expiry",
    "test_renew_of_expired_lease_is_not_found": "Kubernetes has no lease expiry",
    "test_renew_of_a_lease_taken_by_another_node_conflicts": "Kubernetes has no lease expiry",
    "test_renew_with_stale_revision_conflicts": "a renewal with unchanged attributes writes nothing",
    "test_delete_with_stale_revision_conflicts": "a renewal with unchanged attributes writes nothing",
}


@contextlib.contextmanager
def kube_backend(tmp_path: Path) -> Iterator[StoreBackend]:
    """The API double, nodes node-1..node-20 owning 198.19.<n>.0/24; each store is another node's agent."""
    from kube_double import TEST_TOKEN, KubeApiDouble

    from udpflannel.lease.kube import KubeStore

    opened: list[KubeStore] = []
    with KubeApiDouble() as double:
        for n in range(1, 21):
            double.create_node(f"node-{n}", [f"198.19.{n}.0/24"])
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            f"apiVersion: v1\nkind: Config\ncurrent-context: d\n"
            f"clusters: [{{name: d, cluster: {{server: '{double.url}'}}}}]\n"
            f"users: [{{name: u, user: {{token: {TEST_TOKEN}}}}}]\n"
            f"contexts: [{{name: d, context: {{cluster: d, user: u}}}}]\n"
        )

        def open_store() -> KubeStore:
            store = KubeStore(f"node-{len(opened) + 1}", kubeconfig=str(kubeconfig), retry_for=5)
            opened.append(store)
            return store

        try:
            yield StoreBackend(
                open=open_store,
                advance=lambda seconds: None,
                compact=lambda keep: double.compact(),
                caps=ALL_CAPS - {CAP_RESERVE},
                unsupported=KUBE_UNSUPPORTED,
            )
        finally:
            for store in opened:
                store.close()


STORE_BACKENDS: dict[str, Callable[[Path], contextlib.AbstractContextManager[StoreBackend]]] = {
    "sqlite": sqlite_backend,
    "etcd": etcd_backend,
    "kube": kube_backend,
}
NETWORKED = {"etcd", "kube"}  # backends with a server (tests/conftest.py private_net)


@dataclass
class StoreFactory:
    """What the `store_factory` fixture hands a test: call it for a store client (same backing store each
    call), `advance` to move time, `backend` for compaction and capabilities."""

    backend: StoreBackend
    name: str
    stores: list[Store] = field(default_factory=list)

    def __call__(self) -> tuple[Store, Callable[[float], None]]:
        store = self.backend.open()
        self.stores.append(store)
        return store, self.backend.advance

    def require(self, cap: str) -> None:
        if cap not in self.backend.caps:
            pytest.skip(f"the {self.name} store has no {cap!r} capability")


@pytest.fixture(params=sorted(STORE_BACKENDS))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    if request.param in NETWORKED:  # its servers and clients in a namespace of the module's own
        request.getfixturevalue("private_net")
    with STORE_BACKENDS[request.param](tmp_path) as backend:
        reason = backend.unsupported.get(request.node.originalname)
        if reason:
            pytest.skip(f"the {request.param} store: {reason}")
        yield StoreFactory(backend=backend, name=request.param)


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()
