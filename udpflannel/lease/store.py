"""The Store protocol every lease store implements (SQLite, etcd, Kubernetes), and its errors.

Stores are plain storage with compare-and-swap; policy (which subnet to pick, when to renew, what to do when a
lease is lost) lives in lease/manager.py. A store never talks to the datapath.
"""

from __future__ import annotations

from typing import Protocol

from udpflannel.lease.model import Event, IPv4Network, IPv6Network, Lease, LeaseAttrs, LeaseSnapshot


class StoreError(Exception):
    """The store is unreachable or answered something we cannot use; the message says what to do."""


class Conflict(StoreError):
    """A compare-and-swap failed: the key exists (create) or changed under us (renew/delete)."""


class NotFound(StoreError):
    """The lease does not exist (any more)."""


class Compacted(StoreError):
    """watch() was asked to resume from a revision the store no longer has: re-list and diff."""


class Store(Protocol):
    """Lease storage with flannel's semantics.

    Revisions are integers that grow with every change; list() reports the revision it read at, and
    watch(after=rev) returns the changes with revision > rev, in order, so list + watch never loses an event.
    """

    def network_config(self) -> str | None:
        """The net-conf JSON held by the store (etcd `<prefix>/config`), or None when it holds none."""
        ...

    def assigned_subnets(self) -> tuple[IPv4Network | None, IPv6Network | None] | None:
        """The subnet(s) this store dictates for our node (Kubernetes podCIDR), or None if we may choose."""
        ...

    def list(self) -> LeaseSnapshot:
        """All unexpired leases and reservations, with the revision they were read at."""
        ...

    def create(
        self,
        subnet: IPv4Network | None,
        ipv6_subnet: IPv6Network | None,
        attrs: LeaseAttrs,
        ttl: float,
    ) -> Lease:
        """Create a lease if no unexpired lease or reservation holds this key; raise Conflict otherwise."""
        ...

    def renew(self, lease: Lease, attrs: LeaseAttrs, ttl: float) -> Lease:
        """Extend (and update the attributes of) a lease we hold. Conflict if it changed since `lease`,
        NotFound if it is gone. A reservation stays a reservation."""
        ...

    def delete(self, lease: Lease) -> None:
        """Remove a lease we hold (NotFound if already gone)."""
        ...

    def reserve(
        self, subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs
    ) -> Lease:
        """Create a reservation: a lease that never expires and only attrs.public_ip may take."""
        ...

    def watch(self, after: int, timeout: float) -> list[Event]:
        """Changes with revision > after, waiting up to `timeout` seconds for the first one ([] on timeout).
        Raises Compacted when `after` is older than the store keeps."""
        ...

    def close(self) -> None: ...
